#!/usr/bin/env bash
# Streams a completion with Triton's HTTP generate_stream endpoint (server-sent events).
# Usage: client_examples/http_generate_stream.sh ["prompt"] [max_tokens]
# Top-level keys that are not model inputs (max_tokens, temperature) become request
# parameters, which the llm model reads as sampling parameters.
set -euo pipefail
PROMPT=${1:-"The capital of France is"}
MAX_TOKENS=${2:-64}
URL=${TRITON_HTTP_URL:-http://localhost:8000}
BODY=$(python3 -c 'import json,sys; print(json.dumps({"text_input": sys.argv[1], "stream": True,
    "max_tokens": int(sys.argv[2]), "temperature": 0}))' "$PROMPT" "$MAX_TOKENS")
curl -sS -N -X POST "$URL/v2/models/llm/generate_stream" \
    -H 'Content-Type: application/json' -d "$BODY"
# Not streamed, one response (the prompt is prepended unless exclude_input_in_output is true):
#   curl -sS -X POST "$URL/v2/models/llm/generate" -d '{"text_input": "Hi", "max_tokens": 16}'
