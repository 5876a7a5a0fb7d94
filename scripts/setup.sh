#!/usr/bin/env bash
# Creates .venv/ at the repository root with pagedserve, its test tools and a real tritonserver
# (from the nvidia-pytriton wheel). The default model that model_repository/ serves is committed
# (model_repository/llm/1/default_model/; python -m pagedserve.devtools.train retrains it).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Without a GPU, take the CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch
    else
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
fi
.venv/bin/python -m pip install -q -e ".[triton,kernels,test]"
# Finds tritonserver and prepares the backend directory `pagedserve serve` passes to it
# (python backend + the stub for this Python + pagedserve), so a missing piece fails here.
.venv/bin/pagedserve backend-dir >/dev/null
# Builds the C++ decode-attention kernel the CPU engine uses (cached; ~35 s the first time),
# the fp8 W8A8 GEMM kernel of FP8 checkpoints on the CPU (cached; ~40 s), and the CPU's small
# per-layer ops (norms, rotary, SiLU-and-mul, KV write; cached; ~60 s).
.venv/bin/python -m pagedserve_kernels.cpu_decode
.venv/bin/python -m pagedserve_kernels.cpu_fp8_gemm
.venv/bin/python -m pagedserve_kernels.cpu_ops
