"""Streams through the ensemble (preprocessing -> llm) with TensorRT-LLM's input names.

    .venv/bin/python client_examples/ensemble_stream.py "Once upon a time" --max-tokens 64

The ensemble takes [1, 1] shapes like TensorRT-LLM's; its streamed text_output deltas
concatenate to exactly the non-streamed text, spaces and multi-byte characters included.
"""

from __future__ import annotations

import argparse
import queue

import numpy as np
import tritonclient.grpc as grpcclient


def _input(name: str, value, dtype: str) -> grpcclient.InferInput:
    array = np.array([[value]], dtype=np.object_ if dtype == "BYTES" else None)
    if dtype == "INT32":
        array = array.astype(np.int32)
    elif dtype == "FP32":
        array = array.astype(np.float32)
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()

    inputs = [
        _input("text_input", args.prompt, "BYTES"),
        _input("max_tokens", args.max_tokens, "INT32"),
        _input("temperature", args.temperature, "FP32"),
        _input("stream", True, "BOOL"),
        _input("exclude_input_in_output", True, "BOOL"),
        _input("return_num_output_tokens", True, "BOOL"),
    ]
    client = grpcclient.InferenceServerClient(args.url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("ensemble", inputs)
    tokens = 0
    try:
        while True:
            result, error = responses.get()
            if error is not None:
                raise SystemExit(f"\nerror: {error}")
            print(result.as_numpy("text_output").reshape(-1)[0].decode(), end="", flush=True)
            tokens += int(result.as_numpy("num_output_tokens").sum())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    print(f"\n[{tokens} tokens]")


if __name__ == "__main__":
    main()
