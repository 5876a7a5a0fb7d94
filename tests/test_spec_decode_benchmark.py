"""benchmarks/spec_decode.py: its --smoke run on the trained target prints the table with tokens
drafted and accepted and greedy outputs equal to the base's; its workloads are fixed and the
code-editing prompts hold the code their answers should repeat; its output check catches a
difference."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_decode.py"
ROW = re.compile(r"^\| (ngram|draft_model|eagle3) \| (on|off) \| (\d+) \| (\d+) \| ([\d.]+) \| "
                 r"([\d.]+) \| ([\d.]+)x( MISMATCH)? \| ([\d.]+|-) \| ([\d.]+) \| ([\d. /]+) \|$",
                 re.MULTILINE)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("spec_decode_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(bench):
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(str(bench.TARGET))


def test_smoke_prints_the_table_with_accepted_drafts_and_matching_outputs():
    run = subprocess.run([sys.executable, str(BENCHMARK), "--smoke"], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "greedy outputs with speculation equal those without in every run" in run.stdout
    assert "MISMATCH" not in run.stdout, run.stdout
    rows = ROW.findall(run.stdout)
    ngram = [r for r in rows if r[0] == "ngram"]
    assert {(r[1], r[2]) for r in ngram} == {(a, b) for a in ("on", "off") for b in ("1", "2")}
    for row in ngram:
        assert float(row[4]) > 0 and float(row[5]) > 0
        split = [float(x) for x in row[10].split(" / ")]
        assert len(split) == 4 and abs(sum(split) - 1.0) < 0.02 and split[1] > 0
    # Tokens were drafted and some accepted: the comparison of outputs is not vacuous.
    assert all(r[8] != "-" and float(r[8]) > 1.0 for r in ngram if r[1] == "off"), run.stdout
    assert re.search(r"repeat the code: [\d.]+ of their tokens", run.stdout)
    for method in ("draft_model", "eagle3"):
        drafted = [r for r in rows if r[0] == method]
        assert drafted or f"{method}: unavailable" in run.stdout, run.stdout


def test_code_editing_prompts_hold_the_code_the_answer_repeats(bench, tokenizer):
    def complete(prompts):  # stands in for the target: any fixed continuation per prompt
        return [[7 + len(p) % 5] * 6 for p in prompts]

    workload = bench.code_editing_workload(tokenizer, 3, 80, complete)
    again = bench.code_editing_workload(tokenizer, 3, 80, complete)
    assert workload.prompts == again.prompts and len(workload.prompts) == 3
    marker = tokenizer(bench.EDIT_MARKER, add_special_tokens=False).input_ids
    for prompt, excerpt, code in zip(workload.prompts, bench.code_excerpts(tokenizer, 3, 80),
                                     workload.expected):
        assert prompt == excerpt + code + marker + excerpt[1:]
        text = tokenizer.decode(excerpt, skip_special_tokens=True)
        assert text.startswith(("def ", "class ", "async def ")) and 64 <= len(excerpt) <= 81
        assert bench.repeat_fraction(code, code) == 1.0


def test_heldout_prompts_are_fixed_beginnings_of_heldout_files(bench, tokenizer):
    workload = bench.heldout_code_workload(tokenizer, 4, 40)
    assert workload.prompts == bench.heldout_code_workload(tokenizer, 4, 40).prompts
    assert len({tuple(p) for p in workload.prompts}) == 4
    assert all(len(p) == 41 and p[0] == tokenizer.bos_token_id for p in workload.prompts)


def test_the_output_check_finds_a_difference(bench):
    assert bench.first_difference([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) is None
    found = bench.first_difference([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 7, 6]])
    assert found is not None and found.startswith("request 1: first difference at token 1")
    assert bench.repeat_fraction([1, 2, 9, 3], [1, 2, 3]) == 0.75
