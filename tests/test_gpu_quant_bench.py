"""benchmarks/gpu_quant_bench.py --smoke: the GPU script's logic (layers built through the
quantization methods' load code, the GEMM and decode tables, the targets, the JSON and markdown
output) runs end to end on the CPU, so that it is right the first time it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_quant_bench.py"


def test_smoke_run_writes_every_table_and_judges_the_targets(tmp_path):
    out, md = tmp_path / "quant.json", tmp_path / "benchmarks.md"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    assert figures["complete"] and figures["smoke"] and figures["bandwidth"] > 0
    assert figures["errors"] == []
    w4, fp8, decode = figures["w4a16_gemm"], figures["fp8_gemm"], figures["decode"]
    assert [(r["k"], r["n"], r["m"]) for r in w4] == [
        (128, 256, 1), (128, 256, 16), (256, 512, 1), (256, 512, 16)]
    assert all(r["us"] > 0 and r["bf16_us"] > 0 and r["gb_s"] > 0 for r in w4)
    # The bandwidth target is judged at M=1 on the large shapes only.
    assert [(r["k"], r["m"]) for r in w4 if r["target"]] == [(256, 1)]
    assert [(r["k"], r["n"], r["m"]) for r in fp8] == [(128, 256, 16), (256, 512, 16)]
    assert not any(r["target"] for r in fp8)  # M=16 < 256: below the FP8 target's range
    assert [(r["config"], r["batch"]) for r in decode] == [
        (c, b) for c in ("bf16", "w4a16", "fp8", "fp8 + fp8 kv") for b in (1, 4)]
    assert all(r["tok_s"] > 0 for r in decode)
    table = md.read_text()
    separators = [line for line in table.splitlines() if line.startswith("| --- |")]
    assert len(separators) == 3 and "Measured copy bandwidth" in table
    assert "Target: >= 70% of the copy bandwidth" in table
    w4_line = next(line for line in table.splitlines() if line.startswith("| 256x512 | 1 |"))
    assert ("meets >= 70%" in w4_line) == (
        next(r for r in w4 if r["target"])["bandwidth_frac"] >= 0.7)
    decode_line = next(line for line in table.splitlines() if line.startswith("| w4a16 | 1 |"))
    assert "2.0x" in decode_line  # the W4A16 batch-1 target is printed next to its figure


def test_a_failing_measurement_is_recorded_and_listed_not_fatal():
    sys.path.insert(0, str(BENCHMARK.parent))  # it imports its sibling scripts
    try:
        spec = importlib.util.spec_from_file_location("gpu_quant_bench", BENCHMARK)
        bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench  # its dataclasses look their module up
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARK.parent))
    errors: list[str] = []
    assert bench.attempt(errors, "W4A16 GEMM 8x8 M=1", lambda: 1 / 0) is None
    assert bench.attempt(errors, "ok", lambda value: value, 3) == 3
    assert errors == ["W4A16 GEMM 8x8 M=1: ZeroDivisionError: division by zero"]
    table = bench.markdown("card", 1e12, [], [], None, errors)
    assert "Failed (rows left out):\n- W4A16 GEMM 8x8 M=1: ZeroDivisionError" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_the_full_run_refuses_and_says_how_to_smoke():
    run = subprocess.run([sys.executable, str(BENCHMARK)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert run.returncode == 2 and "--smoke" in run.stderr, run.stderr
