"""Stage 1 (the project's .venv): the seeded base checkpoint and the calibration texts.

Writes tests/fixtures/quant/base/ (fp16 Llama, with the only copy of the tokenizer files) and
.cache/quant-work/calibration.json (short stdlib excerpts, the same on every machine with the
same Python version).
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from pagedserve.devtools.stdlib_corpus import describe, source_files  # noqa: E402
from pagedserve.devtools.tiny_model import build_tiny_model  # noqa: E402


def calibration_texts() -> list:
    """The first CALIBRATION_SAMPLES training files long enough to give a whole excerpt, each
    cut at a line break near CALIBRATION_CHARS."""
    texts = []
    for source in source_files("train"):
        text = source.text.strip()
        if len(text) < 2 * common.CALIBRATION_CHARS:
            continue
        cut = text.rfind("\n", 0, common.CALIBRATION_CHARS)
        texts.append(text[: cut if cut > 0 else common.CALIBRATION_CHARS])
        if len(texts) == common.CALIBRATION_SAMPLES:
            break
    return texts


def main() -> None:
    common.WORK.mkdir(parents=True, exist_ok=True)
    common.CALIBRATION.write_text(json.dumps(calibration_texts(), indent=1) + "\n")
    if common.BASE.exists():
        for path in common.BASE.iterdir():
            path.unlink()
    build_tiny_model(common.BASE, **common.BASE_MODEL_ARGS)
    for junk in ("generation_config.json",):
        (common.BASE / junk).unlink(missing_ok=True)
    corpus = describe()
    common.record_fixture(
        "base", new=True,
        producer="pagedserve.devtools.tiny_model",
        format="float16 (unquantized)",
        build_args=common.BASE_MODEL_ARGS,
        calibration=(
            f"{common.CALIBRATION_SAMPLES} excerpts of <= {common.CALIBRATION_CHARS} chars from "
            f"the Python {corpus['python']} stdlib training split (pagedserve.devtools."
            "stdlib_corpus)"
        ),
    )
    print(common.BASE)


if __name__ == "__main__":
    main()
