"""Loads the HF fast tokenizer that ships with a checkpoint (local files only)."""

from __future__ import annotations

import os
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """Returns `AutoTokenizer.from_pretrained(path)` as a fast (Rust-backed) tokenizer.

    Raises ValueError when `path` is not a directory holding tokenizer files, or when only a
    slow (pure Python) tokenizer can be built: the incremental detokenizer needs the Rust one.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is not a directory")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the tokenizer in {path!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "_tokenizer", None) is None:
        raise ValueError(f"the tokenizer in {path!r} is not a fast (tokenizers-backed) tokenizer")
    return tokenizer


def bad_words_token_ids(words: list[str], tokenizer: Any) -> list[list[int]]:
    """The token sequences that spell each bad word, as vLLM finds them.

    A word is encoded without special tokens as written (leading spaces stripped), and again
    after one space, since a word inside the text usually starts with one; that second form is
    kept when it starts with another token and has as many tokens (a new word token rather than
    a space token in front). A word that encodes to nothing is a ValueError.
    """
    sequences: list[list[int]] = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            raise ValueError(f"SamplingParams.bad_words entry {word!r} encodes to no tokens")
        sequences.append(list(bare))
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(list(spaced))
    return sequences
