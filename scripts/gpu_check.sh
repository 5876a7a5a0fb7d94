#!/usr/bin/env bash
# Every GPU check and benchmark of pagedserve, in one call, within 10 minutes on one H100/H200
# (the stage limits add up to 590 s; the device tool allows 600 s per call),
# using only what that machine has (its python3 with torch, triton, transformers; no network).
#
#   scripts/gpu_check.sh            # writes logs and JSON under $OUT (default: a temp dir)
#   scripts/gpu_check.sh quick      # ~2 minutes: async-scheduling tests and the decode table
#
# Sections (each with its own time limit, so one failure does not cost the rest):
#   1. kernel tests on CUDA (fp16/bf16/fp32, long-context split-KV)
#   2. engine on CUDA: HF parity (fp32 exact, bf16 within HF's top-k), CUDA graphs vs eager
#   3. attention kernel bandwidth at 4k and 16k context
#   4. batch-1 decode: graph replay time against the whole step
#   5. benchmark table for a 1B-class Llama (decode tok/s with/without graphs, roofline,
#      offline throughput vs HF generate); printed last and appended to docs/benchmarks.md
#   6. quantized paths: W4A16 and FP8 GEMMs vs bf16 (% of bandwidth), decode tok/s of the same
#      model in bf16, W4A16, FP8, FP8 + FP8 KV; appended to docs/benchmarks.md
#   7. speculative decoding on CUDA (CUDA graphs for 1 + k-token decodes, the draft model's
#      own): the CPU table's benchmark, n-gram, draft model and EAGLE-3, batch 1/32, one run
#      each
#   8. the mp executor with one rank (its engine in a worker-less executor seam) gives the
#      uniproc executor's tokens on CUDA; one GPU cannot run NCCL with tp 2
#   9. placement: an engine placed as a KIND_GPU instance on GPU 0 (tp 1) runs there, on its
#      own thread (GPU 1 and GPU_DEVICE_IDS "1" where there is a second GPU); tp 2, or a
#      device id past the last GPU, fails naming the fields
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PAGEDSERVE_CACHE=${PAGEDSERVE_CACHE:-/tmp/pagedserve-cache}
status=()

# The packages' folders are their import names: no install (nothing can be downloaded there).
export PYTHONPATH="$PWD/backend:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # run NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    status+=("$name: rc=$rc, $((SECONDS - start))s")
}

if [ "${1:-}" = quick ]; then
    run gpu_bench 120 "$PY" benchmarks/gpu_bench.py --skip-offline --json "$OUT/gpu_bench.json" \
        --markdown docs/benchmarks.md
    cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
    run async_tests 60 "$PY" -m pytest tests/test_async_scheduling.py -q -p no:cacheprovider -x
    printf '%s\n' "${status[@]}"
    exit 0
fi

xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
run kernel_tests 100 "$PY" -m pytest tests/kernels -q -p no:cacheprovider "${xdist[@]}" \
    --maxfail=20
run engine_tests 110 "$PY" -m pytest tests/gpu tests/test_hf_parity.py -q -p no:cacheprovider \
    "${xdist[@]}" --maxfail=10
run attention_bench 40 "$PY" benchmarks/attention_bench.py --json "$OUT/attention_bench.json"
run graph_probe 25 "$PY" benchmarks/graph_replay_probe.py
run gpu_bench 145 "$PY" benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" \
    --markdown docs/benchmarks.md
# Short: GEMMs first (50 graph replays each), then 32 decode steps per row; its JSON is
# rewritten after each table, so a stop at the limit keeps the GEMM figures.
run gpu_quant_bench 85 "$PY" benchmarks/gpu_quant_bench.py --json "$OUT/gpu_quant_bench.json" \
    --markdown docs/benchmarks.md
run spec_decode 45 "$PY" benchmarks/spec_decode.py --repeat 1 --max-tokens 32 --batches 1 32
run executor 20 "$PY" -m pytest tests/test_executor.py -q -p no:cacheprovider \
    -k mp_with_one_rank_is_uniproc
run placement 20 "$PY" -m pytest tests/test_placement.py -q -p no:cacheprovider -k test_cuda_
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null

echo "=== summary"
printf '%s\n' "${status[@]}"
echo "=== benchmark table"
sed -n '/^## /,$p' "$OUT/gpu_bench.log" 2>/dev/null | tail -n 20
echo "=== speculative decoding"
sed -n '/^| method/,$p' "$OUT/spec_decode.log" 2>/dev/null | tail -n 30
echo "=== quantized paths"
sed -n '/^## Quantized/,$p' "$OUT/gpu_quant_bench.log" 2>/dev/null | tail -n 50
