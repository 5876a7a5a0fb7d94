"""Paths, prompts and the manifest shared by every stage of the quantized-fixture build.

Each stage runs in its own virtual environment (the producers' pins conflict), so this module
imports nothing beyond the standard library and is loaded by path, not as part of pagedserve.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Dict, Iterable

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "quant"
BASE = FIXTURES / "base"
MANIFEST = FIXTURES / "MANIFEST.json"
WORK = REPO / ".cache" / "quant-work"
CALIBRATION = WORK / "calibration.json"

# The base model: every group size (32/64/128) and the 128x128 FP8 block divide every K and N.
BASE_MODEL_ARGS: Dict[str, Any] = dict(
    arch="llama",
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    tokenizer="bpe",
    tokenizer_vocab_size=384,
    torch_dtype="float16",
    seed=10,
)
CALIBRATION_SAMPLES = 48
CALIBRATION_CHARS = 400
# The prompts whose logits each fixture's producer loader records (reference_logits.safetensors).
PROMPTS = (
    "def fibonacci(n):\n    return",
    "import os\nimport sys\n\nclass Config:\n",
    "The quick brown fox",
)
# Files a fixture keeps: what a loader needs. Tokenizer files live once, in base/.
KEPT_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "quantize_config.json",
    "quant_config.json",
)


def keep_checkpoint_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies the loader-relevant files of a producer's output `src` into the fixture `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in KEPT_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    shards = sorted(src.glob("model-*.safetensors"))
    for shard in shards:
        shutil.copy2(shard, dst / shard.name)
    for path in dst.iterdir():
        path.chmod(0o644)


def load_manifest() -> Dict[str, Any]:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    return {"fixtures": {}, "environments": {}, "stages": {}}


NOTES = [
    "Built by scripts/make_quant_fixtures.sh from base/ (its only copy of the tokenizer files: "
    "load a fixture with tokenizer=base/).",
    "reference_logits.safetensors: input_ids_<i> int32 and logits_<i> [len, vocab] fp32 per "
    "prompt, computed by the producer's own loader (reference_logits_loader, in "
    "reference_logits_dtype).",
    "AutoAWQ folds its activation scales into the preceding norms and linears, so its norm "
    "weights differ from base/ too; AutoRound keeps them (but in bf16).",
    "Quantized weights are reproducible byte for byte; GPTQModel's config records a random "
    "offload_to_disk_path.",
]


def save_manifest(manifest: Dict[str, Any]) -> None:
    manifest["notes"] = NOTES
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def record_fixture(name: str, new: bool = False, **fields: Any) -> None:
    """Adds or updates the manifest entry of fixture `name` (stages run one after another);
    `new` drops what an earlier build recorded (a producer run starts the entry afresh)."""
    manifest = load_manifest()
    if new:
        manifest["fixtures"].pop(name, None)
    entry = manifest["fixtures"].setdefault(name, {})
    entry.update(fields)
    save_manifest(manifest)


def record_environment(name: str, packages: Iterable[str]) -> None:
    manifest = load_manifest()
    manifest["environments"][name] = sorted(packages)
    save_manifest(manifest)


def calibration_texts() -> list:
    return json.loads(CALIBRATION.read_text())
