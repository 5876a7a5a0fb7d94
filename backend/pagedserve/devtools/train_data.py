"""Token windows for training and evaluating the default models.

Each file becomes ``BOS + tokens + EOS``; the files of a split are concatenated (train: in a
seeded shuffled order; held-out: in path order) and cut into windows of ``context + 1`` tokens
that overlap by one, so that window ``i`` predicts its last token from ``context`` tokens and
every token of the stream is a label exactly once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy as np


@dataclass(frozen=True)
class TokenWindows:
    """A split's token stream cut into ``[num_windows, context + 1]`` windows (uint16)."""

    windows: np.ndarray
    num_files: int
    num_tokens: int  # the whole stream, of which the windows hold all but a tail

    @property
    def context(self) -> int:
        return self.windows.shape[1] - 1

    def evenly_spaced(self, count: int) -> np.ndarray:
        """`count` windows spread over the stream (all of them when there are fewer): a
        fixed evaluation subset that samples every part of the split, not only its first
        files."""
        n = len(self.windows)
        if count >= n:
            return self.windows
        return self.windows[np.linspace(0, n - 1, count).round().astype(np.int64)]


def encode_files(tokenizer, texts: Sequence[str], bos_id: int, eos_id: int) -> List[np.ndarray]:
    """Each text as ``BOS + ids + EOS`` (a `tokenizers.Tokenizer`; encoded in parallel)."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray([bos_id, *enc.ids, eos_id], dtype=np.uint16) for enc in encodings]


def pack(files: Sequence[np.ndarray], context: int, *, shuffle_seed: int | None = None
         ) -> TokenWindows:
    """Concatenates `files` (shuffled by `shuffle_seed` unless it is None) into windows."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    order = list(range(len(files)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    stream = np.concatenate([files[i] for i in order]) if files else np.zeros(0, np.uint16)
    num_windows = max(0, (len(stream) - 1) // context)
    if num_windows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one window of {context + 1}")
    starts = np.arange(num_windows) * context
    windows = stream[starts[:, None] + np.arange(context + 1)[None, :]]
    return TokenWindows(windows, len(files), len(stream))


def batches(windows: np.ndarray, batch_size: int, seed: int, num_batches: int
            ) -> Iterator[np.ndarray]:
    """`num_batches` batches of `batch_size` windows; the windows are reshuffled (seeded) at
    the start of each pass over them, and a pass's remainder is dropped."""
    if batch_size > len(windows):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(windows)} training windows")
    per_pass = len(windows) // batch_size
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(windows))
    for step in range(num_batches):
        if step and step % per_pass == 0:
            order = rng.permutation(len(windows))
        i = (step % per_pass) * batch_size
        yield windows[order[i:i + batch_size]]
