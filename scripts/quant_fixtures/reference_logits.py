"""Stage (run in each producer's environment): the logits of the fixed prompts as the producer's
own loader computes them, into <fixture>/reference_logits.safetensors (fp32; input_ids_<i> and
logits_<i> [len, vocab] per prompt).

    python reference_logits.py LOADER FIXTURE...

LOADER is `transformers` (transformers with the quantizer integration the checkpoint names:
compressed-tensors, or gptqmodel behind transformers' GPTQ/AWQ/AutoRound support) or `gptqmodel`
(GPTQModel.load). A loader that fails is recorded in the manifest with its error.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time
import traceback
from typing import Dict, List

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def load(loader: str, path: str):
    import torch

    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    device_map="cpu").eval()
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        try:
            return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float32)
        except (NotImplementedError, ValueError) as exc:
            # GPTQModel 7.7's torch GPTQ kernel computes in fp16/bf16 only.
            print(f"fp32 refused ({exc}); loading in float16", flush=True)
            return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    raise ValueError(f"unknown loader {loader!r}")


def write_logits(loader: str, name: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.BASE)
    with tempfile.TemporaryDirectory() as tmp:
        # Loaders that want a tokenizer beside the weights get base/'s (kept once, there).
        for source in (common.BASE, common.FIXTURES / name):
            for path in source.glob("*.json"):
                (pathlib.Path(tmp) / path.name).unlink(missing_ok=True)
                (pathlib.Path(tmp) / path.name).symlink_to(path)
        for path in (common.FIXTURES / name).glob("*.safetensors"):
            if path.name != "reference_logits.safetensors":
                (pathlib.Path(tmp) / path.name).symlink_to(path)
        model = load(loader, tmp)
        tensors: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, prompt in enumerate(common.PROMPTS):
                ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                logits = model(input_ids=ids).logits[0].float()
                tensors[f"input_ids_{i}"] = ids[0].to(torch.int32)
                tensors[f"logits_{i}"] = logits.contiguous()
    out = common.FIXTURES / name / "reference_logits.safetensors"
    dtype = str(next(getattr(model, "model", model).parameters()).dtype).replace("torch.", "")
    save_file(tensors, str(out), metadata={"loader": loader, "dtype": dtype})
    out.chmod(0o644)


def main(argv: List[str]) -> int:
    from importlib import metadata

    from safetensors import safe_open

    loader, names = argv[0], argv[1:]
    for name in names:
        if "failed" in common.load_manifest()["fixtures"].get(name, {}):
            continue
        start = time.monotonic()
        try:
            write_logits(loader, name)
        except Exception as exc:
            traceback.print_exc()
            common.record_fixture(
                name, reference_logits=False,
                reference_logits_note=f"{loader} loader failed on the CPU: "
                f"{type(exc).__name__}: {exc}"[:1500])
            print(f"{name}: reference logits FAILED ({exc!r})", flush=True)
            continue
        versions = ", ".join(
            f"{pkg} {metadata.version(pkg)}" for pkg in
            ("transformers", "compressed-tensors", "gptqmodel", "torch")
            if _installed(pkg))
        with safe_open(str(common.FIXTURES / name / "reference_logits.safetensors"), "pt") as f:
            dtype = f.metadata()["dtype"]
        common.record_fixture(name, reference_logits=True, reference_logits_dtype=dtype,
                              reference_logits_loader=f"{loader} ({versions}), {dtype} on the CPU")
        print(f"{name}: reference logits in {time.monotonic() - start:.1f}s", flush=True)
    return 0


def _installed(pkg: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
