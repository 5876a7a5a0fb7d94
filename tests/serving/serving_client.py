"""Client helpers for the serving tests: gRPC streams, HTTP SSE, Prometheus metrics."""

from __future__ import annotations

import json
import queue
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import requests
import tritonclient.grpc as grpcclient

_DTYPES = {np.bool_: "BOOL", np.int32: "INT32", np.uint64: "UINT64", np.float32: "FP32"}


def tensor(name: str, value: Any, batch: bool = False) -> grpcclient.InferInput:
    """An input from a scalar, a string or a list; ``batch`` adds a leading [1] dimension."""
    if isinstance(value, (str, bytes)):
        array = np.array([value], dtype=np.object_)
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        array = np.array(value, dtype=np.object_)
    elif isinstance(value, bool):
        array = np.array([value], dtype=np.bool_)
    elif isinstance(value, (list, tuple)):
        array = np.array(value, dtype=np.int32)
    elif isinstance(value, float):
        array = np.array([value], dtype=np.float32)
    elif isinstance(value, int):
        array = np.array([value], dtype=np.int32)
    else:
        array = np.asarray(value)
    if batch:
        array = array.reshape(1, -1)
    dtype = "BYTES" if array.dtype == np.object_ else _DTYPES[array.dtype.type]
    item = grpcclient.InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return item


@dataclass
class StreamResult:
    """Everything one streamed request received."""

    responses: list[dict[str, np.ndarray]] = field(default_factory=list)
    error: Optional[Exception] = None
    final_seen: bool = False

    def texts(self) -> list[str]:
        return [r["text_output"].reshape(-1)[0].decode("utf-8") for r in self.responses
                if "text_output" in r]

    def text(self) -> str:
        return "".join(self.texts())

    def ids(self) -> list[int]:
        return [int(t) for r in self.responses for t in r.get("output_ids", np.array([]))]


def _as_dict(result: Any) -> dict[str, np.ndarray]:
    out = {}
    for output in result.get_response().outputs:
        out[output.name] = result.as_numpy(output.name)
    return out


class GrpcStream:
    """One gRPC bidirectional stream; requests are told apart by their ids."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error)))
        self._next = 0

    def send(self, model: str, inputs: list, request_id: Optional[str] = None) -> str:
        if request_id is None:
            request_id = f"req-{self._next}"
            self._next += 1
        self.client.async_stream_infer(model, inputs, request_id=request_id)
        return request_id

    def collect(
        self,
        ids: list[str],
        timeout: float = 60.0,
        on_response: Optional[Callable[[str, int], None]] = None,
    ) -> dict[str, StreamResult]:
        """Gathers responses until every request in ``ids`` got its final response."""
        results = {i: StreamResult() for i in ids}
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            result, error = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                # tritonclient drops the request id of an error: only unambiguous with one.
                if len(pending) != 1:
                    raise AssertionError(f"error with {len(pending)} requests pending: {error}")
                rid = pending.pop()
                results[rid].error = error
                continue
            response = result.get_response()
            rid = response.id
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                results[rid].responses.append(_as_dict(result))
                if on_response is not None:
                    on_response(rid, len(results[rid].responses))
            if final:
                results[rid].final_seen = True
                pending.discard(rid)
        return results

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def sse_token_ids(events: list[dict]) -> list[int]:
    """The output_ids of streamed events, in order (an event holds one id, or a list of them
    when deltas were merged)."""
    ids: list[int] = []
    for e in events:
        value = e["output_ids"]
        ids.extend(value if isinstance(value, list) else [value])
    return ids


def sse_events(response: requests.Response) -> list[dict]:
    """The JSON events of a generate_stream (SSE) response."""
    events = []
    with response:
        for line in response.iter_lines(decode_unicode=False):
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):].decode("utf-8")))
    return events


_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)\{([^}]*)\}\s+(\S+)$')


def metrics(url: str, model: str = "llm") -> dict[str, float]:
    """The model's vllm:* samples, keyed by name plus any label other than model/version."""
    values = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        match = _SAMPLE.match(line)
        if not match or not match.group(1).startswith("vllm:"):
            continue
        labels = dict(kv.split("=", 1) for kv in match.group(2).split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.pop("model", None) != model:
            continue
        labels.pop("version", None)
        key = match.group(1) + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
        values[key] = float(match.group(3))
    return values


def wait_for_metrics(
    url: str, check: Callable[[dict[str, float]], bool], timeout: float = 20.0,
    model: str = "llm",
) -> dict[str, float]:
    """Polls the metrics endpoint until ``check`` holds (they are updated asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(url, model)
        if check(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)
