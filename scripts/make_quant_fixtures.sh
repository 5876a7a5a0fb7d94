#!/usr/bin/env bash
# Regenerates tests/fixtures/quant/ (the quantized checkpoints the tests load) with the real
# producers. Run by a developer, never by setup or CI: it builds two virtual environments under
# .cache/quant-venvs/ (their pins conflict with each other and with .venv/; ~1-6 GB each) and
# takes several minutes on 2 cores. Needs .venv/ (scripts/setup.sh) for the base model.
#
#   scripts/make_quant_fixtures.sh            # every stage
#   scripts/make_quant_fixtures.sh llmc gptq  # only these stages (base must exist)
#
# Stages: base (seeded fp16 tiny Llama + calibration texts), fp8 (native FP8 by our own code),
# llmc (llm-compressor), gptq (GPTQModel, AutoRound, AutoAWQ); each writes its fixtures, their
# reference logits (the producer's own loader) and its entries in tests/fixtures/quant/MANIFEST.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRIVER=scripts/quant_fixtures
VENVS=.cache/quant-venvs
PROJECT_PY=.venv/bin/python
[ -x "$PROJECT_PY" ] || PROJECT_PY=/work/main/.venv/bin/python
export PYTHONPATH="$ROOT/backend:$ROOT/kernels"
export GPTQMODEL_CPU_WORKERS=2 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then  # a whole rebuild starts from nothing
    STAGES=(base fp8 llmc gptq)
    rm -rf tests/fixtures/quant
fi

# Pins: llm-compressor 0.14 caps torch <= 2.14.0 and transformers <= 5.17; GPTQModel 7.7 and
# auto-round 0.16 want newer transformers. torch 2.13.0 (a CPU build) satisfies both.
LLMC_PINS=(torch==2.13.0 llmcompressor==0.14.0.1)
GPTQ_PINS=(torch==2.13.0 auto-round==0.16.1 gptqmodel==7.7.0)
AWQ_PIN=autoawq==0.2.9  # deprecated, pins torch 2.3: installed --no-deps
AWQ_DEPS=(zstandard)

make_venv() {  # name, pins...
    local name=$1; shift
    if [ ! -x "$VENVS/$name/bin/python" ]; then
        python3 -m venv "$VENVS/$name"
        "$VENVS/$name/bin/pip" install -q "${@:1:1}"  # torch first, from the local CPU wheel
        "$VENVS/$name/bin/pip" install -q "$@"
    fi
}

record_env() {  # venv name, package regex
    "$VENVS/$1/bin/pip" freeze | grep -iE "$2" \
        | "$VENVS/$1/bin/python" -c "import sys; sys.path.insert(0, '$DRIVER'); import common; \
common.record_environment('$1', [l.strip() for l in sys.stdin])"
}

in_work() {  # runs a command in .cache/quant-work (GPTQModel writes logs/ into its cwd)
    mkdir -p .cache/quant-work
    (cd .cache/quant-work && "$@")
}

timed() {  # stage name, command...
    local name=$1; shift
    local start=$SECONDS
    "$@"
    echo "stage $name: $((SECONDS - start)) s"
    "$PROJECT_PY" -c "import sys; sys.path.insert(0, '$DRIVER'); import common; \
m = common.load_manifest(); m['stages']['$name'] = {'wall_s': $((SECONDS - start))}; \
common.save_manifest(m)"
}

for stage in "${STAGES[@]}"; do
    case $stage in
    base)
        timed base "$PROJECT_PY" $DRIVER/base.py ;;
    fp8)
        timed fp8 "$PROJECT_PY" $DRIVER/native_fp8.py ;;
    llmc)
        timed llmc-venv make_venv llmcompressor "${LLMC_PINS[@]}"
        record_env llmcompressor '^(torch|transformers|llmcompressor|compressed-tensors|accelerate)=='
        timed llmc "$VENVS/llmcompressor/bin/python" $DRIVER/llmcompressor_fixtures.py
        timed llmc-logits "$VENVS/llmcompressor/bin/python" $DRIVER/reference_logits.py \
            transformers $(cd tests/fixtures/quant && ls -d ct-*) ;;
    gptq)
        timed gptq-venv make_venv gptq "${GPTQ_PINS[@]}"
        "$VENVS/gptq/bin/pip" install -q --no-deps "$AWQ_PIN"
        "$VENVS/gptq/bin/pip" install -q "${AWQ_DEPS[@]}"
        record_env gptq '^(torch|transformers|gptqmodel|auto-round|auto_round|autoawq|optimum)=='
        timed gptq in_work "$ROOT/$VENVS/gptq/bin/python" "$ROOT/$DRIVER/gptq_fixtures.py"
        timed gptq-logits in_work "$ROOT/$VENVS/gptq/bin/python" \
            "$ROOT/$DRIVER/reference_logits.py" gptqmodel \
            $(cd tests/fixtures/quant && ls -d gptq-* ar-* awq-*) ;;
    *)
        echo "unknown stage $stage (base, fp8, llmc, gptq)" >&2; exit 2 ;;
    esac
done
du -sh tests/fixtures/quant
