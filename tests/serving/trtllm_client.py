"""A TensorRT-LLM client as TensorRT-LLM's end_to_end_grpc_client.py behaves, re-implemented.

What that client does and this one does too: every input is shaped [1, 1] per prompt (word
lists [1, k]), ``text_input``, ``max_tokens``, ``stream``, ``beam_width`` and ``temperature``
(1.0 unless told) and ``exclude_input_in_output`` (false unless told) are always sent, the
others only when given; ``--batch-inputs`` stacks the prompts into one [N, 1] request; it opens
a stream per request, sends, calls ``stop_stream()`` (which waits for the server to finish)
and reads ``text_output[0]`` of every response, filed by ``batch_index`` and
``sequence_index`` (both [1, 1] when present); streamed text is appended.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def request_inputs(
    prompt: str,
    output_len: int,
    *,
    streaming: bool = False,
    beam_width: int = 1,
    temperature: float = 1.0,
    num_return_sequences: Optional[int] = None,
    stop_words: Sequence[str] = (),
    bad_words: Sequence[str] = (),
    embedding_bias_words: Sequence[str] = (),
    embedding_bias_weights: Sequence[float] = (),
    return_log_probs: bool = False,
    end_id: Optional[int] = None,
    pad_id: Optional[int] = None,
    exclude_input_in_output: bool = False,
    **scalars: Any,
) -> dict[str, np.ndarray]:
    """One prompt's inputs, name -> array with the batch dimension first."""
    inputs = {
        "text_input": np.array([[prompt]], dtype=object),
        "max_tokens": np.array([[output_len]], dtype=np.int32),
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[beam_width]], dtype=np.int32),
        "temperature": np.array([[temperature]], dtype=np.float32),
        "exclude_input_in_output": np.array([[exclude_input_in_output]], dtype=bool),
    }
    if num_return_sequences is not None:
        inputs["num_return_sequences"] = np.array([[num_return_sequences]], dtype=np.int32)
    for name, words in (("stop_words", stop_words), ("bad_words", bad_words)):
        if words:
            inputs[name] = np.array([list(words)], dtype=object)
    if embedding_bias_words:
        inputs["embedding_bias_words"] = np.array([list(embedding_bias_words)], dtype=object)
        inputs["embedding_bias_weights"] = np.array([list(embedding_bias_weights)],
                                                    dtype=np.float32)
    if return_log_probs:
        inputs["return_log_probs"] = np.array([[True]], dtype=bool)
    for name, value in (("end_id", end_id), ("pad_id", pad_id)):
        if value is not None:
            inputs[name] = np.array([[value]], dtype=np.int32)
    for name, value in scalars.items():  # e.g. top_k=5, seed=3, return_num_output_tokens=True
        dtype = {bool: bool, float: np.float32}.get(type(value), np.int32)
        if name == "seed":
            dtype = np.uint64
        inputs[name] = np.array([[value]], dtype=dtype)
    return inputs


@dataclass
class Run:
    """What one run of the client got: texts[batch][sequence], and every response."""

    texts: list[list[str]]
    responses: list[dict[str, np.ndarray]] = field(default_factory=list)
    errors: list[InferenceServerException] = field(default_factory=list)


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array)
    return item


def run(
    url: str,
    model: str,
    prompts: Sequence[str],
    *,
    batch_inputs: bool = False,
    outputs: Sequence[str] = ("text_output",),
    **options: Any,
) -> Run:
    """Sends each prompt (or all of them as one batch) and gathers the texts as the client."""
    per_prompt = [request_inputs(p, **options) for p in prompts]
    if batch_inputs:
        requests = [{k: np.concatenate([inp[k] for inp in per_prompt]) for k in per_prompt[0]}]
    else:
        requests = per_prompt
    n = options.get("num_return_sequences") or options.get("beam_width", 1)
    wanted = list(outputs)
    if n > 1:
        wanted.append("sequence_index")
    if batch_inputs:
        wanted.append("batch_index")
    result = Run(texts=[[""] * n for _ in prompts])
    client = grpcclient.InferenceServerClient(url)
    received: queue.Queue = queue.Queue()
    try:
        for index, request in enumerate(requests):
            client.start_stream(callback=lambda result, error: received.put((result, error)))
            client.async_stream_infer(
                model,
                [_tensor(name, array) for name, array in request.items()],
                outputs=[grpcclient.InferRequestedOutput(name) for name in wanted],
            )
            client.stop_stream()  # returns once the server has closed the stream
            while not received.empty():
                answer, error = received.get()
                if error is not None:
                    result.errors.append(error)
                    continue
                _file(result, answer, index, options.get("streaming", False))
    finally:
        client.close()
    return result


def _file(result: Run, answer: Any, request_index: int, streaming: bool) -> None:
    tensors = {o.name: answer.as_numpy(o.name) for o in answer.get_response().outputs}
    result.responses.append(tensors)
    text = tensors["text_output"][0].decode("utf-8")  # the client's own indexing: 1-D
    batch = tensors["batch_index"][0][0] if "batch_index" in tensors else request_index
    sequence = tensors["sequence_index"][0][0] if "sequence_index" in tensors else 0
    if streaming:
        result.texts[batch][sequence] += text
    else:
        result.texts[batch][sequence] = text
