"""Stage (.cache/quant-venvs/llmcompressor): compressed-tensors checkpoints from llm-compressor.

Each recipe runs `oneshot` on a fresh fp16 copy of the base model with the calibration texts, and
`save_pretrained(save_compressed=True)` writes the checkpoint. lm_head stays unquantized (the
`ignore` list); embeddings are never targeted (only Linear modules are).
"""

from __future__ import annotations

import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Dict, List

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

IGNORE = ["lm_head"]


def int_weights(bits: int, strategy: str, symmetric: bool = True, group_size=None,
                actorder=None) -> Dict[str, Any]:
    weights: Dict[str, Any] = dict(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy=strategy, dynamic=False)
    if group_size is not None:
        weights["group_size"] = group_size
    if actorder is not None:
        weights["actorder"] = actorder
    return weights


def scheme(weights: Dict[str, Any], activations=None) -> Dict[str, Any]:
    return {"group_0": {"targets": ["Linear"], "weights": weights,
                        "input_activations": activations}}


# name -> (modifier, scheme preset name or config_groups, fields recorded in the manifest)
RECIPES: Dict[str, Any] = {
    "ct-w4a16-g128-sym": ("GPTQModifier", "W4A16",
                         dict(bits=4, group_size=128, sym=True, desc_act=False)),
    "ct-w4a16-channel-sym": ("GPTQModifier", scheme(int_weights(4, "channel")),
                            dict(bits=4, group_size=-1, sym=True, desc_act=False)),
    # c-t 0.19 removed actorder "group" (the g_idx layout): "weight" quantizes in activation
    # order and stores contiguous groups, so the checkpoint has no g_idx.
    "ct-w4a16-g64-sym-actorder-weight": (
        "GPTQModifier", scheme(int_weights(4, "group", group_size=64, actorder="weight")),
        dict(bits=4, group_size=64, sym=True, desc_act=False, actorder="weight")),
    "ct-w4a16-g128-asym": ("GPTQModifier", "W4A16_ASYM",
                          dict(bits=4, group_size=128, sym=False, desc_act=False)),
    "ct-w8a16-channel": ("GPTQModifier", "W8A16",
                        dict(bits=8, group_size=-1, sym=True, desc_act=False)),
    "ct-w8a8-int-dynamic": ("GPTQModifier", "W8A8",
                           dict(bits=8, group_size=-1, sym=True, desc_act=False,
                                activations="int8 dynamic per-token")),
    "ct-w8a8-int-static": (
        "GPTQModifier",
        scheme(int_weights(8, "channel"),
               dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)),
        dict(bits=8, group_size=-1, sym=True, desc_act=False,
             activations="int8 static per-tensor")),
    "ct-fp8-dynamic": ("QuantizationModifier", "FP8_DYNAMIC",
                       dict(bits=8, group_size=-1, sym=True, desc_act=False,
                            activations="fp8 dynamic per-token")),
    "ct-fp8-static": ("QuantizationModifier", "FP8",
                      dict(bits=8, group_size=None, sym=True, desc_act=False,
                           activations="fp8 static per-tensor")),
    "ct-fp8-block": ("QuantizationModifier", "FP8_BLOCK",
                     dict(bits=8, group_size=[128, 128], sym=True, desc_act=False,
                          activations="fp8 dynamic per-token-group 128")),
}


def calibration_dataset(tokenizer):
    from datasets import Dataset

    rows = [tokenizer(text) for text in common.calibration_texts()]
    return Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [r["attention_mask"] for r in rows],
    })


def make_modifier(kind: str, chosen_scheme):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    cls = {"GPTQModifier": GPTQModifier, "QuantizationModifier": QuantizationModifier}[kind]
    if isinstance(chosen_scheme, str):
        return cls(targets="Linear", scheme=chosen_scheme, ignore=IGNORE)
    return cls(config_groups=chosen_scheme, ignore=IGNORE)


def run(name: str, failures: List[str]) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, chosen_scheme, fields = RECIPES[name]
    start = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(common.BASE, dtype=torch.float16)
        tokenizer = AutoTokenizer.from_pretrained(common.BASE)
        modifier = make_modifier(kind, chosen_scheme)
        oneshot(model=model, dataset=calibration_dataset(tokenizer), recipe=[modifier],
                max_seq_length=256, num_calibration_samples=common.CALIBRATION_SAMPLES)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            common.keep_checkpoint_files(__import__("pathlib").Path(tmp), common.FIXTURES / name)
    except Exception as exc:  # a producer failure is recorded, and the others go on
        failures.append(name)
        common.record_fixture(name, new=True, producer="llm-compressor",
                              failed=f"{type(exc).__name__}: {exc}"[:2000])
        print(f"{name}: FAILED {exc!r}", flush=True)
        return
    import json

    qconfig = json.loads((common.FIXTURES / name / "config.json").read_text())[
        "quantization_config"]
    recipe = (f"oneshot(recipe=[{kind}(targets='Linear', scheme={chosen_scheme!r}, "
              f"ignore={IGNORE})], {common.CALIBRATION_SAMPLES} calibration texts, "
              "max_seq_length=256)") if isinstance(chosen_scheme, str) else (
              f"oneshot(recipe=[{kind}(config_groups={chosen_scheme!r}, ignore={IGNORE})], "
              f"{common.CALIBRATION_SAMPLES} calibration texts, max_seq_length=256)")
    common.record_fixture(
        name, new=True,
        producer="llm-compressor",
        producer_version=(f"llmcompressor {metadata.version('llmcompressor')}, compressed-tensors "
                          f"{metadata.version('compressed-tensors')}"),
        recipe=recipe,
        format=f"compressed-tensors {qconfig.get('format')}",
        ignored=qconfig.get("ignore", []) + ["model.embed_tokens (not a Linear)"],
        quantization_config=qconfig,
        wall_s=round(time.monotonic() - start, 1),
        **fields,
    )
    print(f"{name}: ok in {time.monotonic() - start:.1f}s", flush=True)


def main(argv: List[str]) -> int:
    names = argv or list(RECIPES)
    failures: List[str] = []
    for name in names:
        run(name, failures)
    print("failed:", failures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
