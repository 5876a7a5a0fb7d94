"""benchmarks/tp_overhead.py: two gloo ranks pass real decode-step diffs over the mp executor's
control channel and broadcast the sampled tokens; it prints a row per batch size and judges the
target at 256 running requests (the figures themselves are the benchmark's, not a test's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_overhead.py"
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / "
                 r"([\d.]+) \|$", re.MULTILINE)


def test_the_benchmark_prints_every_batch_size_and_judges_the_target():
    run = subprocess.run([sys.executable, str(BENCHMARK), "--steps", "5", "--running", "3",
                          "256"], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    rows = ROW.findall(run.stdout)
    assert [int(r[0]) for r in rows] == [3, 256], run.stdout
    for row in rows:
        send, tokens, both = float(row[1]), float(row[3]), float(row[5])
        assert send > 0 and tokens > 0 and both >= max(send, tokens)
    verdict = re.search(r"at 256 running: (met|MISSED)", run.stdout)
    assert verdict and (verdict.group(1) == "met") == (run.returncode == 0), run.stdout
