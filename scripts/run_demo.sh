#!/usr/bin/env bash
# Starts tritonserver with model_repository/ (pagedserve serve), waits until it is ready,
# streams a completion to the terminal over gRPC, then stops the server.
# Run scripts/setup.sh first (README: scripts/setup.sh && scripts/run_demo.sh).
#   scripts/run_demo.sh ["prompt"]        KEEP_SERVER=1 leaves the server running.
# The default model writes Python; end a prompt with a newline where a line ends (the tokenizer
# joins "):" and the newline after it into one token, so a prompt that stops at "):" asks for
# more on the same line). Greedy with a repetition penalty: small models loop when fully greedy.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-$'def fibonacci(n):\n'}
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}
LOG=${LOG:-.cache/tritonserver.log}
mkdir -p "$(dirname "$LOG")"

.venv/bin/pagedserve serve --model-repository model_repository \
    --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
    --allow-gpu-metrics false >"$LOG" 2>&1 &
SERVER=$!
stop() { kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true; }
[ "${KEEP_SERVER:-0}" = 1 ] || trap stop EXIT

echo "starting tritonserver (log: $LOG) ..." >&2
for _ in $(seq 1 600); do
    if curl -sf "localhost:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "tritonserver exited; last lines of $LOG:" >&2; tail -n 40 "$LOG" >&2; exit 1
    fi
    sleep 0.5
done
curl -sf "localhost:$HTTP_PORT/v2/health/ready" >/dev/null || { tail -n 40 "$LOG" >&2; exit 1; }

echo "--- the prompt, then the streamed completion ---" >&2
printf '%s' "$PROMPT"
.venv/bin/python client_examples/grpc_stream.py --url "localhost:$GRPC_PORT" \
    --max-tokens "${MAX_TOKENS:-96}" --repetition-penalty 1.2 "$PROMPT"
echo "--- metrics ---" >&2
curl -s "localhost:$METRICS_PORT/metrics" | grep -E '^vllm:(generation_tokens_total|prompt_tokens_total|time_to_first_token_seconds_sum)' >&2
if [ "${KEEP_SERVER:-0}" = 1 ]; then
    echo "server left running (pid $SERVER; HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT)" >&2
fi
