"""Streams a completion from the llm model over gRPC, printing text as tokens arrive.

    .venv/bin/python client_examples/grpc_stream.py "Once upon a time" --max-tokens 64

Uses vllm_backend's tensor contract: text_input, stream, sampling_parameters (JSON). Ctrl-C
cancels the request on the server (stop_stream(cancel_requests=True)), freeing its KV cache.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def _input(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream_completion(
    url: str, model: str, prompt: str, sampling: dict, show_finish: bool = True
) -> str:
    """Sends one streamed request and prints its text deltas; returns the whole text."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = [
        _input("text_input", np.array([prompt], dtype=np.object_), "BYTES"),
        _input("stream", np.array([True]), "BOOL"),
        _input("sampling_parameters", np.array([json.dumps(sampling)], dtype=np.object_),
               "BYTES"),
        _input("return_finish_reason", np.array([True]), "BOOL"),
    ]
    client.async_stream_infer(model, inputs)
    text, cancelled = [], False
    try:
        while True:
            result, error = responses.get()
            if error is not None:
                raise SystemExit(f"\nerror: {error}")
            delta = result.as_numpy("text_output")[0].decode("utf-8")
            text.append(delta)
            print(delta, end="", flush=True)
            if result.get_response().parameters["triton_final_response"].bool_param:
                if show_finish:
                    reason = result.as_numpy("finish_reason")[0].decode()
                    print(f"\n[finish_reason: {reason}]", file=sys.stderr)
                break
    except KeyboardInterrupt:
        cancelled = True
        print("\n[cancelled]", file=sys.stderr)
    finally:
        client.stop_stream(cancel_requests=cancelled)
        client.close()
    return "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="vLLM's repetition_penalty (> 1 discourages repeating tokens)")
    args = parser.parse_args()
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.repetition_penalty is not None:
        sampling["repetition_penalty"] = args.repetition_penalty
    stream_completion(args.url, args.model, args.prompt, sampling)


if __name__ == "__main__":
    main()
