"""Builds small, deterministic tokenizers from the embedded corpus.

Two kinds, matching the two families real checkpoints use:

* ``"bpe"``: byte-level BPE (Llama-3 / Qwen2 style): NFC normalizer, a regex Split then ByteLevel
  pre-tokenizer, ByteLevel decoder; every byte sequence is representable, multi-byte characters
  may be split across tokens. The pipeline is exactly the one transformers' `Qwen2Tokenizer`
  rebuilds (transformers 5 forces that class on model_type "qwen2" whatever tokenizer.json says),
  so a qwen2 checkpoint loads the tokenizer it was saved with.
* ``"sentencepiece"``: Llama-2 style: Metaspace ("▁", prepended to the first word, no split)
  pre-tokenizer, BPE with byte fallback (``<0x00>``..``<0xFF>`` are ordinary vocab entries right
  after the special tokens), decoders Replace/ByteFallback/Fuse/Strip.

Both have the special tokens ``<unk>`` (0), ``<s>`` (1, bos, prepended by the post-processor),
``</s>`` (2, eos) and ``<pad>`` (3).
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
from typing import Any, Dict, Iterable, List, Tuple

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from pagedserve.devtools.corpus import training_lines

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]
TOKENIZER_KINDS = ("bpe", "sentencepiece")
_NUM_BYTES = 256
# Words with an optional leading non-letter, single digits, punctuation runs, newline runs,
# whitespace runs (Qwen2's split; Llama-3 differs only in grouping up to 3 digits).
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _extra_chars_for(vocab_size: int) -> int:
    # Pseudo-word text needed for the trainer to find enough frequent pairs; measured so that
    # 8192 is reached while training stays well under a second.
    return max(0, vocab_size - 1000) * 40


def _bos_post_processor() -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
    )


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE ("bpe" kind: specials first, BOS prepended) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = _bos_post_processor()
    return tok


def _build_byte_level_bpe(vocab_size: int) -> Tokenizer:
    return train_byte_level_bpe(training_lines(_extra_chars_for(vocab_size)), vocab_size)


def _most_frequent_chars(lines: List[str], n: int) -> List[str]:
    counts = collections.Counter("".join(lines).replace(" ", "▁"))
    return [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _build_sentencepiece_bpe(vocab_size: int) -> Tokenizer:
    # Train on "▁word" pieces (split=True) so that learned pieces start at word boundaries as
    # SentencePiece's do, then rebuild the model with the Llama-2 vocab layout (specials, the 256
    # byte tokens, the learned pieces) and Llama-2's unsplit Metaspace for encoding.
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    num_learned = max(vocab_size - len(SPECIAL_TOKENS) - _NUM_BYTES - 3, 64)
    # Newlines are not in Llama-2's alphabet either (they encode as <0x0A>).
    lines = [line.replace("\n", " ") for line in training_lines(_extra_chars_for(vocab_size))]
    lines = [line for line in lines if line.strip()]
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned + len(SPECIAL_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # A small alphabet leaves rare characters (most CJK, emoji) to byte fallback, as in
        # Llama-2. Chosen here rather than with the trainer's limit_alphabet, which breaks ties
        # between equally frequent characters in hash order (different in every process).
        initial_alphabet=_most_frequent_chars(lines, 120),
        limit_alphabet=120,
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)

    trained = json.loads(tok.to_str())["model"]
    learned = sorted(
        ((tid, piece) for piece, tid in trained["vocab"].items() if piece not in SPECIAL_TOKENS),
    )
    vocab: Dict[str, int] = {piece: i for i, piece in enumerate(SPECIAL_TOKENS)}
    for b in range(_NUM_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for _, piece in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges: List[Tuple[str, str]] = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]
    ]
    # Whitespace runs (code indentation) get their own pieces, as in Llama-2's vocab.
    for run in (2, 4, 8):
        piece = "▁" * run
        if piece not in vocab:
            vocab[piece] = len(vocab)
            merges.append(("▁" * (run // 2), "▁" * (run // 2)))
    out = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    )
    out.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    out.add_special_tokens(SPECIAL_TOKENS)
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    out.post_processor = _bos_post_processor()
    return out


@functools.lru_cache(maxsize=16)
def _tokenizer_json(kind: str, vocab_size: int) -> str:
    if kind == "bpe":
        tok = _build_byte_level_bpe(vocab_size)
    elif kind == "sentencepiece":
        tok = _build_sentencepiece_bpe(vocab_size)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    for i, special in enumerate(SPECIAL_TOKENS):
        # The builders rely on the specials having the first ids.
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    return tok.to_str()


def build_tokenizer(kind: str = "bpe", vocab_size: int = 2048) -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` of the given kind with at most `vocab_size` tokens.

    The result can be smaller than asked when the corpus has no more frequent pairs. Training
    results are cached per (kind, vocab_size) within the process, so building many models is cheap.
    """
    return Tokenizer.from_str(_tokenizer_json(kind, vocab_size))


def wrap_fast_tokenizer(tok: Tokenizer):
    """Wraps `tok` in a transformers fast tokenizer with the special tokens declared."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # Clean-up rewrites " ." to "." and so on; real Llama tokenizers disable it and the
        # incremental detokenizer's parity tests assume it is off.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def save_fast_tokenizer(hf_tok: Any, out: pathlib.Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    hf_tok.save_pretrained(out)
    # transformers 5 no longer writes special_tokens_map.json; older loaders (and people) look
    # for it.
    path = out / "special_tokens_map.json"
    if not path.exists():
        tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        path.write_text(json.dumps(tokens, indent=2) + "\n")
