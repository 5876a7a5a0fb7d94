"""benchmarks/tp_overhead.py: two gloo ranks pass real decode-step diffs, with rank 0's tokens,
over the mp executor's control channel before a collective standing for the model's; it prints a
row per batch size and judges the target at 256 running requests (the figures themselves are the
benchmark's, not a test's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_overhead.py"
ROW = re.compile(r"^\| (\d+) \| (\d+) \| ([\d.]+) / [\d.]+ \| ([\d.]+) / [\d.]+ \| "
                 r"([\d.]+) / [\d.]+ \| (-?[\d.]+) \|$", re.MULTILINE)


def test_the_benchmark_prints_every_batch_size_and_judges_the_target():
    run = subprocess.run([sys.executable, str(BENCHMARK), "--steps", "5", "--running", "3",
                          "256"], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    rows = ROW.findall(run.stdout)
    assert [int(r[0]) for r in rows] == [3, 256], run.stdout
    sizes = [int(r[1]) for r in rows]
    assert 0 < sizes[0] < sizes[1] < 64 * 1024  # a decode step of 256 fits one broadcast
    for row in rows:
        send, alone, both, added = (float(x) for x in row[2:])
        assert send > 0 and alone > 0 and both > 0
        assert added == pytest.approx(both - alone, abs=2e-3)
    verdict = re.search(r"at 256 running: (met|MISSED)", run.stdout)
    assert verdict and (verdict.group(1) == "met") == (run.returncode == 0), run.stdout


def test_async_scheduling_steps_broadcast_their_tokens_unjudged():
    # The message without tokens, then their broadcast in the step; the target is the
    # synchronous steps' (async scheduling is off on the CPU).
    run = subprocess.run([sys.executable, str(BENCHMARK), "--steps", "5", "--running", "256",
                          "--async-scheduling"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "their broadcast in the step" in run.stdout
    [row] = ROW.findall(run.stdout)
    assert int(row[0]) == 256 and "target" not in run.stdout
