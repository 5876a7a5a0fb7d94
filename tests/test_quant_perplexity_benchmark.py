"""benchmarks/quant_perplexity.py on the committed default model, on one short window: every
variant loads and runs as its name says, and none moves perplexity far from the unquantized
model's (a wrong scale or packing would send it to the hundreds)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_perplexity.py"


def test_every_variant_runs_and_stays_near_the_unquantized_model():
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--windows", "2", "--window-len", "96"],
        capture_output=True, text=True, timeout=900, env=dict(os.environ),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([+-][\d.]+)% \| ([\d.]+)% \|$", run.stdout,
                      re.MULTILINE)
    names = [name for name, *_ in rows]
    assert names[0] == "unquantized" and len(names) == 7, run.stdout
    assert {"W4A16 g128, GPTQ layout", "W4A16 g128, AWQ layout", "FP8 KV cache"} <= set(names)
    for name, _, change, _ in rows[1:]:
        # Measured on 2 windows of 96 tokens: every variant within 1%; 4-bit is the worst.
        assert abs(float(change)) < 5.0, (name, run.stdout)
    assert any(float(change) != 0.0 for _, _, change, _ in rows[1:]), run.stdout
