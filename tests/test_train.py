"""pagedserve.devtools.train: `--quick` trains a pair that transformers and pagedserve load and
that learned something; the corpus split and the data order are deterministic; the committed
default pair (model_repository/llm/1) is what its README says and serves HF's greedy tokens."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from hf_reference import assert_greedy_match, hf_greedy

from pagedserve import LLM, SamplingParams
from pagedserve.devtools import stdlib_corpus, train
from pagedserve.devtools.train_data import batches, pack
from pagedserve.devtools.train_shapes import SHAPES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "model_repository" / "llm" / "1"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    report = train.main(["--quick", "--target-out", str(out / "target"),
                         "--draft-out", str(out / "draft")])
    return out, report


def _engine_greedy(model_dir: pathlib.Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    # No dtype: the engine's default for a float16 checkpoint (float32 on a CPU).
    llm = LLM(str(model_dir), kv_cache_memory_bytes=16 << 20, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0]
    return list(output.outputs[0].token_ids)


def _check_checkpoint(path: pathlib.Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert config["dtype"] == "float16"
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    dtypes = {t.dtype for t in load_file(path / "model.safetensors").values()}
    assert dtypes == {torch.float16}, dtypes
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, config["vocab_size"])
    ids = tok.encode(PROMPT)
    assert ids[0] == 1 and tok.decode(ids[1:]) == PROMPT
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 0
    readme = (path / "README.md").read_text()
    for needed in ("Python Software Foundation License", "python -m pagedserve.devtools.train",
                   "perplexity", "top-1"):
        assert needed in readme, needed


def test_quick_run_writes_loadable_checkpoints(quick):
    out, report = quick
    for name in ("target", "draft"):
        _check_checkpoint(out / name)
    # One tokenizer for both.
    assert (out / "target" / "tokenizer.json").read_bytes() == \
        (out / "draft" / "tokenizer.json").read_bytes()
    assert report.vocab_size == 512


def test_quick_run_learns(quick):
    _, report = quick
    for model in (report.target, report.draft):
        curve = model.loop.curve
        assert curve[-1].train_loss < curve[0].train_loss - 0.3, curve
        heldout = [p.heldout_loss for p in curve if p.heldout_loss is not None]
        assert heldout[-1] < heldout[0], heldout
        # Better than a uniform guess over the vocabulary.
        assert model.heldout.loss < math.log(report.vocab_size) - 1.0
        assert model.loop.tokens >= 40_000 and model.loop.tokens_per_s > 0
    assert 0.0 < report.draft.heldout.agreement <= 1.0


def test_quick_target_serves_hf_greedy_tokens(quick):
    from transformers import AutoTokenizer

    out, _ = quick
    prompt_ids = AutoTokenizer.from_pretrained(out / "target").encode(PROMPT)
    ref = hf_greedy(out / "target", [prompt_ids], 16)[0]
    assert_greedy_match(_engine_greedy(out / "target", prompt_ids, 16), ref)


def test_split_and_data_order_are_deterministic():
    # The split depends on the relative path alone (golden values: any change moves files
    # between the splits and invalidates the committed figures).
    paths = ("os.py", "json/decoder.py", "collections/abc.py", "asyncio/threads.py")
    assert [stdlib_corpus.split_of(p) for p in paths] == ["train", "train", "heldout", "heldout"]
    heldout = stdlib_corpus.source_files("heldout")
    assert all(stdlib_corpus.split_of(f.path) == "heldout" for f in heldout)
    assert [f.path for f in heldout] == [f.path for f in stdlib_corpus.source_files("heldout")]
    files = [np.arange(n, dtype=np.uint16) + 10 * n for n in (5, 9, 3, 12, 7)]
    a, b = pack(files, 4, shuffle_seed=3), pack(files, 4, shuffle_seed=3)
    assert np.array_equal(a.windows, b.windows)
    assert not np.array_equal(a.windows, pack(files, 4, shuffle_seed=4).windows)
    # Windows overlap by one token: each token is a label once.
    assert np.array_equal(a.windows[1:, 0], a.windows[:-1, -1])
    first = [w.copy() for w in batches(a.windows, 2, seed=1, num_batches=5)]
    again = list(batches(a.windows, 2, seed=1, num_batches=5))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_config_is_validated():
    with pytest.raises(ValueError, match="draft_shape"):
        train.TrainConfig(draft_shape="target-l8")  # as big as the target
    with pytest.raises(ValueError, match="vocab_size"):
        train.TrainConfig(vocab_size=100)
    with pytest.raises(ValueError, match="distill_weight"):
        train.TrainConfig(distill_weight=1.5)


# ------------------------------------------------------------------ the committed default pair


def test_shipped_pair_is_as_documented():
    target, draft = SHIPPED / "default_model", SHIPPED / "draft_model"
    for path in (target, draft):
        _check_checkpoint(path)
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    size = sum(f.stat().st_size for d in (target, draft) for f in d.iterdir())
    assert size < 20 << 20, size
    config = json.loads((target / "config.json").read_text())
    vocab, context = config["vocab_size"], config["max_position_embeddings"]
    assert 4096 <= vocab <= 8192 and 512 <= context <= 1024
    for path, name in ((target, "target"), (draft, "draft")):
        assert SHAPES[name].params(vocab) == sum(p.numel() for p in _hf_model(path).parameters())
    for position in (0, context // 2 - 1, context - 1):
        assert SHAPES["draft"].flops_per_token(vocab, position) <= \
            SHAPES["target"].flops_per_token(vocab, position) / 8
    assert json.loads((SHIPPED / "model.json").read_text())["model"] == "default_model"


def test_shipped_target_serves_hf_greedy_tokens():
    from transformers import AutoTokenizer

    target = SHIPPED / "default_model"
    prompt_ids = AutoTokenizer.from_pretrained(target).encode(PROMPT)
    ref = hf_greedy(target, [prompt_ids], 24)[0]
    ours = _engine_greedy(target, prompt_ids, 24)
    assert_greedy_match(ours, ref)


def _hf_model(path: pathlib.Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
