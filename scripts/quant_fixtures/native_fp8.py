"""Stage (the project's .venv): native FP8 checkpoints (`quant_method: fp8`) written by our own
code in vLLM's layout, since no producer of that format runs on the CPU.

Every decoder linear gets an e4m3 weight [N, K]; lm_head and the embeddings stay fp16.
- fp8-native-tensor-dynamic: weight_scale fp32 [] (per tensor), activation_scheme dynamic.
- fp8-native-tensor-static: the same plus input_scale fp32 [] = calibration absmax / 448.
- fp8-native-block: weight_block_size [128, 128], weight_scale_inv fp32 [ceil(N/128),
  ceil(K/128)] (a multiplier despite its name), activation_scheme dynamic.
"""

from __future__ import annotations

import json
import sys
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_quantized_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and any(
        f".{linear}." in name for linear in LINEARS
    )


def quantize_per_tensor(weight: torch.Tensor):
    scale = weight.float().abs().max() / FP8_MAX
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(())


def quantize_blocks(weight: torch.Tensor):
    n, k = weight.shape
    rows, cols = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK)
    padded[:n, :k] = weight.float()
    blocks = padded.reshape(rows, BLOCK, cols, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.reshape(rows * BLOCK, cols * BLOCK)[:n, :k].to(FP8).contiguous(), scale


def activation_absmax() -> Dict[str, float]:
    """The largest |input| each decoder linear sees over the calibration texts (fp32 base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(common.BASE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(common.BASE)
    absmax: Dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            absmax[name] = max(absmax.get(name, 0.0), float(args[0].abs().max()))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_quantized_linear(name + ".weight"):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for text in common.calibration_texts():
            model(**tokenizer(text, return_tensors="pt"))
    return absmax


def write(name: str, tensors: Dict[str, torch.Tensor], qconfig: Dict, description: str) -> None:
    out = common.FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():
        path.unlink()
    config = json.loads((common.BASE / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    common.record_fixture(
        name, new=True,
        producer="pagedserve scripts/quant_fixtures/native_fp8.py (our own code, vLLM's layout)",
        producer_version=f"torch {torch.__version__}",
        format=description,
        bits=8,
        group_size=qconfig.get("weight_block_size"),
        sym=True,
        desc_act=False,
        ignored=["lm_head", "model.embed_tokens", "norms"],
        quantization_config=qconfig,
        reference_logits=False,
        reference_logits_note="no producer loader: the format was written by our own code",
    )


def main() -> None:
    base = load_file(str(common.BASE / "model.safetensors"))
    absmax = activation_absmax()
    variants = {
        "fp8-native-tensor-dynamic": ({"activation_scheme": "dynamic"}, "per-tensor"),
        "fp8-native-tensor-static": ({"activation_scheme": "static"}, "per-tensor"),
        "fp8-native-block": (
            {"activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}, "block"
        ),
    }
    for name, (extra, mode) in variants.items():
        tensors: Dict[str, torch.Tensor] = {}
        for key, value in base.items():
            if not is_quantized_linear(key):
                tensors[key] = value
                continue
            prefix = key[: -len(".weight")]
            if mode == "block":
                tensors[key], tensors[prefix + ".weight_scale_inv"] = quantize_blocks(value)
            else:
                tensors[key], tensors[prefix + ".weight_scale"] = quantize_per_tensor(value)
                if extra["activation_scheme"] == "static":
                    tensors[prefix + ".input_scale"] = torch.tensor(absmax[prefix] / FP8_MAX)
        qconfig = {"quant_method": "fp8", **extra}
        write(name, tensors, qconfig, f"native fp8 e4m3, {mode} weights, "
              f"{extra['activation_scheme']} activations")
        print(name)


if __name__ == "__main__":
    main()
