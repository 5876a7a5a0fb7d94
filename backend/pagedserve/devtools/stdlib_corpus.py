"""The text the trained default models learn from and are measured on: the running Python's
standard library sources (PSF license).

Files are read in sorted order and each goes whole to one split, chosen by a hash of its path
relative to the stdlib folder, so the split is the same on every machine with the same Python
version and no held-out file shares text with a training file by construction::

    python -m pagedserve.devtools.stdlib_corpus      # prints the Python version and the counts
"""

from __future__ import annotations

import hashlib
import pathlib
import platform
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

Split = Literal["train", "heldout"]
HELDOUT_PERCENT = 5
# Trees that are not the standard library itself, even where they sit inside its folder.
_SKIPPED_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    """One stdlib source file: its path relative to the stdlib folder and its text."""

    path: str
    text: str


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(rel_path: str) -> Split:
    """The split a file belongs to, from its relative path alone (stable across machines)."""
    bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def source_files(split: Split, root: Optional[pathlib.Path] = None) -> List[SourceFile]:
    """Every ``*.py`` file of ``split``, sorted by path. Files that are not UTF-8 are skipped
    (a few test fixtures declare other encodings); they are the same on every machine."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIPPED_PARTS.intersection(path.relative_to(root).parts) or split_of(rel) != split:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(SourceFile(rel, text))
    return files


def describe(root: Optional[pathlib.Path] = None) -> Dict[str, object]:
    """The Python version and, per split, the file count and size: what a checkpoint's README
    records about its corpus."""
    root = root or stdlib_root()
    out: Dict[str, object] = {"python": platform.python_version(), "root": str(root)}
    for split in ("train", "heldout"):
        files = source_files(split, root)  # type: ignore[arg-type]
        out[split] = {"files": len(files), "chars": sum(len(f.text) for f in files)}
    return out


if __name__ == "__main__":
    print(describe())
