"""Which model class serves which Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

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


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return _ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None
