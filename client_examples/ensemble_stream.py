"""Streams through TensorRT-LLM's entry points (ensemble or tensorrt_llm_bls) with its names.

    .venv/bin/python client_examples/ensemble_stream.py "Once upon a time" --max-tokens 64
    .venv/bin/python client_examples/ensemble_stream.py --model tensorrt_llm_bls --top-k 40 "Hi"

Inputs are [1, 1] like TensorRT-LLM's clients send them. As in TensorRT-LLM, the request is
greedy unless --top-k or --top-p asks for sampling (then --temperature applies). The streamed
text_output deltas concatenate to exactly the non-streamed text, spaces and multi-byte
characters included. Ctrl-C cancels the request: through tensorrt_llm_bls that stops the
generation at once; through the ensemble, Triton 2.51 lets it run to its end.
"""

from __future__ import annotations

import argparse
import queue

import numpy as np
import tritonclient.grpc as grpcclient


def _input(name: str, value, dtype: str) -> grpcclient.InferInput:
    numpy_type = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}
    array = np.array([[value]], dtype=numpy_type[dtype])
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="ensemble", choices=["ensemble", "tensorrt_llm_bls"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    args = parser.parse_args()

    inputs = [
        _input("text_input", args.prompt, "BYTES"),
        _input("max_tokens", args.max_tokens, "INT32"),
        _input("temperature", args.temperature, "FP32"),
        _input("top_k", args.top_k, "INT32"),
        _input("top_p", args.top_p, "FP32"),
        _input("stream", True, "BOOL"),
        _input("return_num_output_tokens", True, "BOOL"),
    ]
    client = grpcclient.InferenceServerClient(args.url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(args.model, inputs)
    tokens = 0
    cancel = False
    try:
        while True:
            result, error = responses.get()
            if error is not None:
                raise SystemExit(f"\nerror: {error}")
            print(result.as_numpy("text_output")[0].decode(), end="", flush=True)
            tokens += int(result.as_numpy("num_output_tokens").sum())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    except KeyboardInterrupt:
        cancel = True
    finally:
        client.stop_stream(cancel_requests=cancel)
        client.close()
    print(f"\n[{tokens} tokens{', cancelled' if cancel else ''}]")


if __name__ == "__main__":
    main()
