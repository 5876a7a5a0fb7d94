"""Stage (.cache/quant-venvs/gptq): GPTQ checkpoints from GPTQModel, AutoRound's two packings,
and AutoAWQ's GEMM format, each on a fresh fp16 copy of the base model.

lm_head stays unquantized (each producer's default for Llama); embeddings are not linear layers.
A producer that fails is recorded in the manifest and the others go on.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
import traceback
from importlib import metadata
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

# name -> GPTQModel QuantizeConfig arguments (format: the checkpoint_format written)
GPTQ_VARIANTS: Dict[str, Dict[str, Any]] = {
    "gptq-v1-4bit-g128-sym": dict(bits=4, group_size=128, sym=True, desc_act=False, format="gptq"),
    "gptq-v2-4bit-g128-sym": dict(bits=4, group_size=128, sym=True, desc_act=False,
                                  format="gptq_v2"),
    "gptq-v1-4bit-g32-asym-descact": dict(bits=4, group_size=32, sym=False, desc_act=True,
                                          format="gptq"),
    "gptq-v2-4bit-g64-asym": dict(bits=4, group_size=64, sym=False, desc_act=False,
                                  format="gptq_v2"),
    "gptq-v1-4bit-channel-sym-descact": dict(bits=4, group_size=-1, sym=True, desc_act=True,
                                             format="gptq"),
    "gptq-v1-8bit-g128-sym-descact": dict(bits=8, group_size=128, sym=True, desc_act=True,
                                          format="gptq"),
}
# The layer AutoRound leaves at 16 bits through extra_config (layer_config).
AR_FP16_LAYER = "model.layers.1.mlp.down_proj"


def version_of(*packages: str) -> str:
    return ", ".join(f"{p} {metadata.version(p)}" for p in packages)


def run_gptqmodel(name: str, out: pathlib.Path) -> Dict[str, Any]:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    args = GPTQ_VARIANTS[name]
    # Without a dtype GPTQModel picks bfloat16 on the CPU; GPTQ checkpoints are fp16.
    model = GPTQModel.load(str(common.BASE), QuantizeConfig(**args), device="cpu",
                           dtype=torch.float16)
    model.quantize(common.calibration_texts(), batch_size=4)
    model.save(str(out))
    return dict(
        producer="GPTQModel", producer_version=version_of("gptqmodel"),
        recipe=f"GPTQModel.load(base, QuantizeConfig({args}), dtype=float16)"
               ".quantize(calibration, "
               "batch_size=4); save()",
        bits=args["bits"], group_size=args["group_size"], sym=args["sym"],
        desc_act=args["desc_act"],
    )


def run_autoround(name: str, out: pathlib.Path, sym: bool, fp16_layer: bool) -> Dict[str, Any]:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(common.BASE, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(common.BASE)
    layer_config = {AR_FP16_LAYER: {"bits": 16}} if fp16_layer else None
    kwargs = dict(bits=4, group_size=128, sym=sym, iters=2, nsamples=len(
        common.calibration_texts()), seqlen=64, dataset=common.calibration_texts(),
        device_map="cpu", layer_config=layer_config)
    autoround = AutoRound(model, tokenizer, **kwargs)
    autoround.quantize_and_save(str(out), format="auto_round")
    shown = {k: v for k, v in kwargs.items() if k != "dataset"}
    return dict(
        note="AutoRound casts the model to bfloat16 on the CPU (its default amp there), so the "
             "checkpoint's unquantized tensors are bf16 and its scales fp16",
        producer="AutoRound", producer_version=version_of("auto-round"),
        recipe=f"AutoRound(model, tokenizer, {shown}, dataset=calibration)"
               ".quantize_and_save(format='auto_round')",
        bits=4, group_size=128, sym=sym, desc_act=False,
    )


def run_autoawq(name: str, out: pathlib.Path) -> Dict[str, Any]:
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    quant_config = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}
    model = AutoAWQForCausalLM.from_pretrained(str(common.BASE))
    tokenizer = AutoTokenizer.from_pretrained(common.BASE)
    texts = common.calibration_texts()
    model.quantize(tokenizer, quant_config=quant_config, calib_data=texts,
                   # AutoAWQ drops each text longer than max_calib_seq_len tokens.
                   max_calib_samples=len(texts), max_calib_seq_len=512,
                   n_parallel_calib_samples=8)
    model.save_quantized(str(out))
    return dict(
        producer="AutoAWQ", producer_version=version_of("autoawq"),
        recipe=f"AutoAWQForCausalLM.from_pretrained(base).quantize(tokenizer, "
               f"quant_config={quant_config}, calib_data=calibration, max_calib_seq_len=512); "
               "save_quantized()",
        bits=4, group_size=128, sym=False, desc_act=False,
    )


def producers() -> Dict[str, Callable[[str, pathlib.Path], Dict[str, Any]]]:
    table: Dict[str, Callable[[str, pathlib.Path], Dict[str, Any]]] = {
        name: run_gptqmodel for name in GPTQ_VARIANTS}
    table["ar-gptq-4bit-g128-sym"] = lambda n, o: run_autoround(n, o, True, True)
    table["ar-awq-4bit-g128-asym"] = lambda n, o: run_autoround(n, o, False, False)
    table["awq-gemm-4bit-g128"] = run_autoawq
    return table


def saved_checkpoint(out: pathlib.Path) -> pathlib.Path:
    """`out`, or the folder under it that a producer named itself (AutoRound's
    `<model>-w4g128/`)."""
    if (out / "config.json").exists():
        return out
    (found,) = [path.parent for path in out.glob("*/config.json")]
    return found


def run(name: str, produce: Callable[[str, pathlib.Path], Dict[str, Any]]) -> bool:
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fields = produce(name, pathlib.Path(tmp))
            common.keep_checkpoint_files(saved_checkpoint(pathlib.Path(tmp)),
                                         common.FIXTURES / name)
    except Exception as exc:
        traceback.print_exc()
        common.record_fixture(name, new=True, failed=f"{type(exc).__name__}: {exc}"[:2000])
        print(f"{name}: FAILED {exc!r}", flush=True)
        return False
    config = json.loads((common.FIXTURES / name / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if qconfig is None:  # a producer that writes only the legacy side file
        for side in ("quantize_config.json", "quant_config.json"):
            if (common.FIXTURES / name / side).exists():
                qconfig = json.loads((common.FIXTURES / name / side).read_text())
    fmt = qconfig.get("quant_method")
    if "packing_format" in qconfig:
        fmt = f"{fmt} {qconfig['packing_format']}"
    elif "checkpoint_format" in qconfig:
        fmt = f"{fmt} {qconfig['checkpoint_format']}"
    elif "version" in qconfig:
        fmt = f"{fmt} {qconfig['version']}"
    common.record_fixture(
        name, new=True, **fields, format=fmt, quantization_config=qconfig,
        ignored=["lm_head", "model.embed_tokens (not a linear layer)"]
        + list(qconfig.get("modules_to_not_convert") or []),
        wall_s=round(time.monotonic() - start, 1))
    print(f"{name}: ok in {time.monotonic() - start:.1f}s", flush=True)
    return True


def main(argv: List[str]) -> int:
    table = producers()
    names = argv or list(table)
    failed = [name for name in names if not run(name, table[name])]
    print("failed:", failed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
