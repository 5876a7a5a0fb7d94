"""IncrementalDetokenizer: streamed deltas add up to the reference decode, never show a partial
character or a partial stop string, and stop strings truncate as vLLM does."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from pagedserve.devtools.corpus import BASE_CORPUS
from pagedserve.devtools.tokenizers_builder import build_tokenizer, wrap_fast_tokenizer
from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer
from pagedserve.tokenizer.tokenizer import load_tokenizer

KINDS = ("bpe", "sentencepiece")
SPECIALS = (0, 1, 2, 3)  # <unk> <s> </s> <pad>
TEXTS = [
    "Hello world!",
    "中文：你好，世界！😀 and 🚀🚀",
    "def f(x):\n    return x  *  2\n\n",
    "Café naïve Ελληνικά    spaces   ",
    "日本語のテキスト、カタカナ。",
]


def _gpt2_byte_chars() -> Dict[int, str]:
    """Byte -> the printable character byte-level BPE uses for it (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.fixture(scope="module", params=KINDS)
def tok(request):
    return wrap_fast_tokenizer(build_tokenizer(request.param, 1024))


def byte_token_ids(tok) -> List[int]:
    """Token id of each single byte 0..255."""
    backend = tok.backend_tokenizer
    if "sentencepiece" in _kind(tok):
        return [backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    chars = _gpt2_byte_chars()
    return [backend.token_to_id(chars[b]) for b in range(256)]


def char_id(tok, ch: str) -> int:
    """The token of a single ASCII character, without SentencePiece's "▁" prefix."""
    tid = tok.convert_tokens_to_ids(ch)
    assert tid is not None and tok.decode([5, tid]).endswith(ch)
    return tid


def _kind(tok) -> str:
    return "sentencepiece" if tok.backend_tokenizer.token_to_id("<0x41>") is not None else "bpe"


def reference(tok, prompt: Sequence[int], gen: Sequence[int], skip: bool) -> Optional[str]:
    """Decode of prompt + output beyond the prompt's text (see detokenizer's docstring).

    None when that is undefined: the output rewrites the prompt's text (a prompt ending in a
    byte-fallback run that invalid output bytes continue turns into U+FFFDs)."""
    full = tok.decode(list(prompt) + list(gen), skip_special_tokens=skip)
    prompt_text = tok.decode(list(prompt), skip_special_tokens=skip)
    if not full.startswith(prompt_text):
        return None
    return full[len(prompt_text):]


def stream(
    tok,
    prompt: Sequence[int],
    gen: Sequence[int],
    rng: random.Random,
    *,
    skip: bool = True,
    stop: Sequence[str] = (),
    include: bool = False,
    final_flag: bool = False,
) -> Tuple[List[str], IncrementalDetokenizer, Optional[str]]:
    """Feeds `gen` in random chunks; returns the deltas, the detokenizer and the stop matched.

    Every delta must extend a prefix of the final text, so nothing is ever retracted."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, stop=list(stop),
                               include_stop_str_in_output=include)
    deltas: List[str] = []
    matched = None
    i = 0
    while i < len(gen) and matched is None:
        k = rng.randint(1, 4)
        chunk = gen[i:i + k]
        i += k
        matched = d.update(chunk, final=final_flag and i >= len(gen))
        if matched is None:
            deltas.append(d.get_next_output_text(finished=False, delta=True))
            full_so_far = d.get_next_output_text(finished=False, delta=False)
            assert full_so_far == "".join(deltas)
    deltas.append(d.get_next_output_text(finished=True, delta=True))
    return deltas, d, matched


def random_gen(tok, rng: random.Random, mode: str, n: int) -> List[int]:
    vocab = len(tok)
    byte_ids = byte_token_ids(tok)
    if mode == "uniform":  # anything, including bytes, specials, invalid UTF-8
        return [rng.randrange(vocab) for _ in range(n)]
    if mode == "text":
        text = rng.choice(TEXTS + BASE_CORPUS.splitlines(keepends=True))
        return tok.encode(text, add_special_tokens=False)[:n]
    # "chars": valid UTF-8 characters spelled byte by byte, mixed with ordinary tokens, runs
    # of spaces and special tokens.
    out: List[int] = []
    space_ids = tok.encode("  ", add_special_tokens=False)
    whole = _whole_char_tokens(tok)
    while len(out) < n:
        r = rng.random()
        if r < 0.4:
            ch = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x4E00, 0x9FFF),
                                 rng.randrange(0x1F300, 0x1F64F)]))
            out += [byte_ids[b] for b in ch.encode()]
        elif r < 0.5:
            out += space_ids
        elif r < 0.6:
            out.append(rng.choice(SPECIALS))
        else:
            out.append(rng.choice(whole))
    return out


_WHOLE: Dict[int, List[int]] = {}


def _whole_char_tokens(tok) -> List[int]:
    """Non-special tokens that decode to whole characters (byte-level BPE merges can end inside
    one)."""
    if id(tok) not in _WHOLE:
        _WHOLE[id(tok)] = [
            t for t in range(len(SPECIALS), len(tok))
            if "\ufffd" not in tok.decode([t]) and t not in byte_token_ids(tok)
        ]
    return _WHOLE[id(tok)]


def random_prompt(tok, rng: random.Random) -> List[int]:
    r = rng.random()
    if r < 0.15:
        return []
    if r < 0.25:
        return [1]
    prompt = tok.encode(rng.choice(TEXTS))
    if r > 0.8:  # ends anywhere, e.g. inside a character or a byte-fallback run
        prompt += random_gen(tok, rng, "uniform", rng.randint(1, 4))
    return prompt


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "text", "chars"])
def test_deltas_add_up_to_reference(tok, mode, skip):
    rng = random.Random(f"{mode}-{skip}-{_kind(tok)}")
    undefined = 0
    for _ in range(400):
        prompt = random_prompt(tok, rng)
        gen = random_gen(tok, rng, mode, rng.randint(0, 40))
        deltas, d, _ = stream(tok, prompt, gen, rng, skip=skip)
        assert "".join(deltas) == d.output_text
        ref = reference(tok, prompt, gen, skip)
        if ref is None:
            undefined += 1
            assert undefined <= 25
            continue
        assert d.output_text == ref, (prompt, gen)
        if mode == "chars" and "\ufffd" not in tok.decode(prompt):
            # All bytes form whole characters: no U+FFFD may ever be streamed.
            assert "\ufffd" not in ref
        if not prompt or (prompt == [1] and skip):
            assert ref == tok.decode(gen, skip_special_tokens=skip)


def test_first_token_keeps_its_space_after_a_prompt(tok):
    """SentencePiece decoders strip the first token's leading space: the generated text is
    taken in the context of the prompt, as vLLM does."""
    word = tok.encode(" world", add_special_tokens=False)
    prompt = tok.encode("Hello")
    deltas, d, _ = stream(tok, prompt, word, random.Random(0))
    assert d.output_text == " world"
    alone = IncrementalDetokenizer(tok, [])
    alone.update(word, final=True)
    assert alone.output_text == tok.decode(word)
    if _kind(tok) == "sentencepiece":
        assert alone.output_text == "world"
    # A skipped special token between prompt and word changes nothing.
    d = IncrementalDetokenizer(tok, prompt)
    d.update([2, 2] + word, final=True)
    assert d.output_text == " world"


def test_multibyte_char_is_held_until_complete(tok):
    ids = byte_token_ids(tok)
    x = [char_id(tok, "x")]
    d = IncrementalDetokenizer(tok, tok.encode("Hi"))
    seen = []
    for b in "中😀".encode():
        d.update([ids[b]])
        seen.append(d.get_next_output_text(False, True))
    assert "\ufffd" not in "".join(seen)
    d.update(x)
    seen.append(d.get_next_output_text(False, True))
    assert "".join(seen) == "中😀x"


def test_invalid_bytes_are_released_at_the_end(tok):
    ids = byte_token_ids(tok)
    gen = [ids[0xE4], ids[0xB8], ids[0xAD], ids[0xE4]]  # a character, then half of one
    deltas, d, _ = stream(tok, tok.encode("a"), gen, random.Random(1))
    assert "".join(deltas) == d.output_text == reference(tok, tok.encode("a"), gen, True)
    assert d.output_text.endswith("\ufffd")


def test_prompt_ending_inside_a_character(tok):
    ids = byte_token_ids(tok)
    prompt = tok.encode("x") + [ids[0xE4], ids[0xB8]]
    tail = tok.encode(" ok", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    d.update([ids[0xAD]] + tail, final=True)
    # The completed character counts as generated text.
    assert d.output_text == "中 ok"


# ------------------------------------------------------------------------------ stop strings


def oracle(ref: str, stops: Sequence[str], include: bool) -> Tuple[str, Optional[str]]:
    """Character by character: the first stop string completed wins (ties: earliest start)."""
    for end in range(1, len(ref) + 1):
        hits = [(end - len(s), i, s) for i, s in enumerate(stops) if ref.startswith(s, end - len(s))
                and end >= len(s)]
        if hits:
            start, _, s = min(hits)
            return ref[: end if include else start], s
    return ref, None


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("num_stops", [1, 3])
def test_stop_strings_random(tok, include, num_stops):
    rng = random.Random(num_stops * 2 + include)
    for _ in range(300):
        prompt = random_prompt(tok, rng)
        gen = random_gen(tok, rng, rng.choice(["text", "chars", "uniform"]), rng.randint(1, 40))
        ref = reference(tok, prompt, gen, True)
        if ref is None:
            continue
        stops = []
        for _ in range(num_stops):
            if ref and rng.random() < 0.85:
                a = rng.randrange(len(ref))
                stops.append(ref[a:a + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["zzz", "中国", "\n\n", "</s>"]))
        deltas, d, matched = stream(tok, prompt, gen, rng, stop=stops, include=include,
                                    final_flag=rng.random() < 0.5)
        expected, expected_stop = oracle(ref, stops, include)
        assert "".join(deltas) == d.output_text == expected, (stops, ref)
        assert d.matched_stop == expected_stop
        if matched is not None:
            assert matched == expected_stop


def test_stop_at_start_and_spanning_tokens(tok):
    gen = tok.encode("Hello world, hello again", add_special_tokens=False)
    for stop, expected in [("Hel", ""), ("o wor", "Hell"), ("again", "Hello world, hello "),
                           ("d, h", "Hello worl")]:
        for include in (False, True):
            deltas, d, matched = stream(tok, [], gen, random.Random(0), stop=[stop],
                                        include=include)
            want = expected + stop if include else expected
            assert matched == stop and "".join(deltas) == d.output_text == want


def test_stop_string_in_multibyte_context(tok):
    ids = byte_token_ids(tok)
    gen = [t for ch in "ab中文cd" for t in
           ([ids[b] for b in ch.encode()] if ord(ch) > 127 else [char_id(tok, ch)])]
    for stop, expected in [("文", "ab中"), ("中文c", "ab"), ("b中", "a")]:
        deltas, d, matched = stream(tok, tok.encode("x"), gen, random.Random(2), stop=[stop])
        assert matched == stop and "".join(deltas) == expected
        assert "\ufffd" not in "".join(deltas)


def test_earliest_stop_wins_and_partial_stop_is_withheld(tok):
    gen = tok.encode(" one two three four", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("x"), stop=["four", "two t", "three"])
    streamed = ""
    for t in gen:
        if d.update([t]) is not None:
            break
        streamed += d.get_next_output_text(False, True)
        # Never a prefix of a stop string at the end of what was streamed.
        assert not any(streamed.endswith(s[:k]) for s in d._stop for k in range(1, len(s)))
    assert d.matched_stop == "two t"
    assert streamed + d.get_next_output_text(True, True) == " one "
    assert d.update(tok.encode(" more", add_special_tokens=False)) is None
    assert d.output_text == " one "


def test_stop_buffer_without_stop_strings(tok):
    d = IncrementalDetokenizer(tok, [], stop=[])
    d.update(tok.encode("abc def", add_special_tokens=False))
    assert d.stop_buffer_length == 0
    assert d.get_next_output_text(False, True) == "abc def"
    d = IncrementalDetokenizer(tok, [], stop=["def"], include_stop_str_in_output=True)
    assert d.stop_buffer_length == 0


# ------------------------------------------------------------------------------ cost, loading


def test_window_stays_small(tok):
    """O(1) work per token: the decode window does not grow with the output, and a long run of
    byte-fallback tokens is decoded once, when it ends."""
    ids = byte_token_ids(tok)
    text = (BASE_CORPUS * 4)[:6000]
    gen = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Hi"))
    calls = []
    decode = d._decode
    d._decode = lambda w, **kw: (calls.append(len(w)), decode(w, **kw))[1]
    widest = 0
    for t in gen:
        d.update([t])
        widest = max(widest, len(d._window))
    run = [ids[b] for b in ("中" * 500).encode()] + [char_id(tok, "x")]
    d.update(run)
    d.get_next_output_text(True, True)
    assert d.output_text == reference(tok, tok.encode("Hi"), gen, True) + "中" * 500 + "x"
    # The window holds a few tokens, or a whole byte-fallback run plus its neighbours.
    byte_set, longest_run, run_len = set(ids), 0, 0
    for t in gen:
        run_len = run_len + 1 if t in byte_set else 0
        longest_run = max(longest_run, run_len)
    assert widest <= max(8, longest_run + 2)
    if _kind(tok) == "sentencepiece":
        # Nothing is decoded inside the byte-fallback run; once at its end.
        assert len(calls) <= len(gen) + 3
    else:
        assert len(calls) <= len(gen) + len(run) + 3
    assert sum(calls) <= 4 * (len(gen) + len(run))


def test_loaded_tokenizers(tiny_model_dir):
    rng = random.Random(7)
    for arch, kind in [("qwen2", "bpe"), ("llama", "sentencepiece")]:
        loaded = load_tokenizer(tiny_model_dir(arch, kind))
        for _ in range(60):
            prompt = random_prompt(loaded, rng)
            gen = random_gen(loaded, rng, rng.choice(["uniform", "chars", "text"]), 30)
            skip = rng.random() < 0.5
            deltas, d, _ = stream(loaded, prompt, gen, rng, skip=skip)
            ref = reference(loaded, prompt, gen, skip)
            assert "".join(deltas) == d.output_text
            assert ref is None or d.output_text == ref


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)
