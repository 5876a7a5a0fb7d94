"""benchmarks/perplexity.py on a tiny random model: the engine's held-out figures equal HF's in
fp32, the command says so and exits 0, and its judge catches an engine that is not fp32."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "perplexity.py"


@pytest.fixture(scope="module")
def perplexity():
    spec = importlib.util.spec_from_file_location("perplexity_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def test_engine_and_hf_agree_and_the_command_exits_zero(model, tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--model", str(model), "--windows", "6",
         "--window-len", "40", "--compare", "hf", "--engine-arg", "max_num_batched_tokens=64",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "agree within fp32 noise" in run.stdout, run.stdout
    figures = json.loads(out.read_text())
    assert figures["positions"] == 6 * 39
    assert figures["disagreements"] == {"logprob": 0, "top1": 0}
    engine, hf = figures["engine"], figures["hf"]
    assert engine["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-4)
    assert engine["top1_accuracy"] == pytest.approx(hf["top1_accuracy"], abs=1 / 234)


def test_the_windows_are_fixed_and_spread_over_the_split(perplexity, model):
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    windows, info = perplexity.heldout_windows(tokenizer, 5, 30)
    again, _ = perplexity.heldout_windows(tokenizer, 5, 30)
    assert windows == again and all(len(w) == 30 for w in windows)
    assert all(w[0] == tokenizer.bos_token_id for w in windows) and info["bos"]
    assert len({tuple(w) for w in windows}) == 5 and info["files"] > 5
    with pytest.raises(SystemExit, match="fewer than --windows"):
        perplexity.heldout_windows(tokenizer, info["tokens"], 30)


def test_the_judge_catches_a_bfloat16_engine(perplexity, model):
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    windows, _ = perplexity.heldout_windows(load_tokenizer(str(model)), 3, 40)
    hf = perplexity.hf_scores(str(model), windows, batch_size=2)
    fp32, _ = perplexity.engine_scores(str(model), {"dtype": "float32"}, windows)
    bf16, _ = perplexity.engine_scores(str(model), {"dtype": "bfloat16"}, windows)
    assert perplexity.disagreements(fp32, hf) == {"logprob": 0, "top1": 0}
    assert perplexity.disagreements(bf16, hf)["logprob"] > 0
