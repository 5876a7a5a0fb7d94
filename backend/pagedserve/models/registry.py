"""Which model class serves which Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

from pagedserve.models.eagle3 import EAGLE3_ARCHITECTURES, Eagle3LlamaForCausalLM
from pagedserve.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 differ from Llama only in flags that ModelConfig reads.
_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def eagle3_head_class(architecture: str) -> type[nn.Module]:
    """The class of an EAGLE-3 draft head's architecture (LlamaForCausalLMEagle3)."""
    if architecture not in EAGLE3_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not an EAGLE-3 head; supported: "
                         f"{', '.join(EAGLE3_ARCHITECTURES)}")
    return Eagle3LlamaForCausalLM


def model_class(architecture: str) -> type[nn.Module]:
    """The class serving a target model's architecture."""
    if architecture in EAGLE3_ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is an EAGLE-3 draft head, not a model to serve on "
            "its own: name it as speculative_config's 'model' with method 'eagle3', beside its "
            "target"
        )
    try:
        return _ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None
