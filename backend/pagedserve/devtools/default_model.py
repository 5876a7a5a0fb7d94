"""Builds the server's default model into model_repository/llm/1/default_model/.

A small random-weight Llama with a byte-level BPE tokenizer, so that the Triton model repository
works out of the box without downloading anything::

    python -m pagedserve.devtools.default_model [--out DIR] [--force]

Nothing is rebuilt when the directory already holds a config.json. Prints the path.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any, Dict, Optional, Union

from pagedserve.devtools.tiny_model import build_tiny_model

# backend/pagedserve/devtools/default_model.py -> the repository root.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO_ROOT / "model_repository" / "llm" / "1" / "default_model"

DEFAULT_MODEL_KWARGS: Dict[str, Any] = dict(
    arch="llama",
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    max_position_embeddings=4096,
    tokenizer="bpe",
    tokenizer_vocab_size=4096,
    seed=0,
    torch_dtype="float32",
)


def build_default_model(
    out_dir: Optional[Union[str, pathlib.Path]] = None, *, force: bool = False
) -> pathlib.Path:
    """Builds the default model into `out_dir` (default: DEFAULT_OUT) unless it is there."""
    out = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_OUT
    if (out / "config.json").is_file() and not force:
        return out
    if out.exists():
        shutil.rmtree(out)
    # Build next to the target and rename, so an interrupted build never looks complete.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    build_tiny_model(tmp, **DEFAULT_MODEL_KWARGS)
    tmp.rename(out)
    return out


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(build_default_model(args.out, force=args.force))


if __name__ == "__main__":
    main()
