"""Streams a completion over HTTP (Triton's generate_stream, server-sent events).

    .venv/bin/python client_examples/http_generate_stream.py "Once upon a time"

Closing the connection (Ctrl-C) cancels the request on the server.
"""

from __future__ import annotations

import argparse
import json

import requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    body = {
        "text_input": args.prompt,
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": args.max_tokens, "temperature": 0}),
    }
    with requests.post(
        f"{args.url}/v2/models/{args.model}/generate_stream", json=body, stream=True, timeout=600
    ) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise SystemExit(f"\nerror ({response.status_code}): {event['error']}")
            print(event["text_output"], end="", flush=True)
    print()


if __name__ == "__main__":
    main()
