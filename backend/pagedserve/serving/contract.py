"""The llm model's tensor contract: vllm_backend's inputs and outputs, plus input_ids/output_ids
and return_prompt_logprobs/prompt_logprobs.

Parsing here is plain numpy and JSON so that it is testable without a tritonserver; the Triton
side (``model.py``, ``handler.py``) only moves tensors in and out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np

from pagedserve.sampling_params import RequestOutputKind, SamplingParams

# vllm_backend's inputs, all optional here because input_ids may replace text_input.
INPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "input_ids", "data_type": "TYPE_INT32", "dims": [-1], "optional": True},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_finish_reason", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_cumulative_logprob", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_logprobs", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_input_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_output_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    # Not vllm_backend's: prompt logprobs in its return_* style.
    {"name": "return_prompt_logprobs", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
)

OUTPUTS: tuple[dict[str, Any], ...] = (
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "cumulative_logprob", "data_type": "TYPE_FP32", "dims": [-1]},
    {"name": "logprobs", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [-1]},
    {"name": "output_ids", "data_type": "TYPE_INT32", "dims": [-1]},
    {"name": "prompt_logprobs", "data_type": "TYPE_STRING", "dims": [1]},
)

RETURN_FLAGS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_prompt_logprobs",
)

Prompt = Union[str, dict[str, list[int]]]
# Request parameters that are not sampling parameters (see _sampling_dict).
_NOT_SAMPLING = frozenset({"id"})


class InvalidRequest(ValueError):
    """The request is malformed; the message names the input or field at fault."""


@dataclass
class GenerateRequest:
    """One Triton request translated for the engine: prompt, sampling, what to send back."""

    prompt: Prompt
    params: SamplingParams
    stream: bool
    prepend_input: bool  # non-streamed text_output starts with the prompt (vllm_backend default)
    flags: frozenset[str]  # the return_* inputs that were true
    # return_cumulative_logprob alone makes the engine compute logprobs the client did not ask
    # for; they must then not be sent as the logprobs output.
    client_logprobs: bool

    def wants(self, flag: str) -> bool:
        return flag in self.flags


def scalar_input(array: np.ndarray, name: str) -> Any:
    """The one element of an input tensor, as a Python value."""
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one element, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value


def text_value(value: Any, name: str) -> str:
    """A BYTES element as text: UTF-8, or an error naming the input."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"input '{name}' is not valid UTF-8: {e}") from None
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"input '{name}' must be a string (BYTES), got {type(value).__name__}")


def _bool(tensors: Mapping[str, np.ndarray], name: str) -> Optional[bool]:
    if name not in tensors:
        return None
    return bool(scalar_input(tensors[name], name))


def _sampling_dict(tensors: Mapping[str, np.ndarray], request_parameters: str) -> dict:
    if "sampling_parameters" in tensors:
        source = "sampling_parameters"
        raw = text_value(scalar_input(tensors["sampling_parameters"], source), source)
    else:
        # vllm_backend's fallback: the request's parameters (HTTP generate puts the top-level
        # keys that are not inputs there).
        source, raw = "request parameters", request_parameters or "{}"
    if not raw.strip():
        return {}
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{source} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise InvalidRequest(f"{source} must be a JSON object, got {type(values).__name__}")
    if source == "request parameters":
        # Names with this prefix are Triton's own (e.g. triton_enable_empty_final_response);
        # "id" is the generate extension's request id, which Triton passes on as a parameter.
        values = {k: v for k, v in values.items()
                  if not k.startswith("triton_") and k not in _NOT_SAMPLING}
    return values


def _sampling_params(values: dict) -> SamplingParams:
    if "lora_name" in values:
        raise InvalidRequest("sampling parameter 'lora_name': LoRA adapters are not supported")
    if "output_kind" in values:
        raise InvalidRequest("sampling parameter 'output_kind' is chosen by the server")
    try:
        params = SamplingParams.from_dict(values, coerce_strings=True)
    except ValueError as e:  # unknown field (names it) or a bad value (names it)
        raise InvalidRequest(str(e)) from None
    return params


def parse_request(
    tensors: Mapping[str, np.ndarray], request_parameters: str = ""
) -> GenerateRequest:
    """Validates one request's input tensors (name -> array) and request parameters (JSON).

    Follows vllm_backend: ``exclude_input_in_output`` defaults to False without streaming
    (the prompt is prepended) and True with streaming, where False is an error.
    """
    has_text, has_ids = "text_input" in tensors, "input_ids" in tensors
    if has_text and has_ids:
        raise InvalidRequest("give either 'text_input' or 'input_ids', not both")
    if has_text:
        prompt: Prompt = text_value(scalar_input(tensors["text_input"], "text_input"), "text_input")
    elif has_ids:
        ids = np.asarray(tensors["input_ids"]).reshape(-1)
        if ids.size == 0:
            raise InvalidRequest("input 'input_ids' is empty")
        prompt = {"prompt_token_ids": [int(t) for t in ids]}
    else:
        raise InvalidRequest("the request has no prompt: give 'text_input' (or 'input_ids')")

    stream = bool(_bool(tensors, "stream"))
    exclude = _bool(tensors, "exclude_input_in_output")
    prepend_input = (not exclude) if exclude is not None else not stream
    if prepend_input and stream:
        raise InvalidRequest(
            "'exclude_input_in_output' = false is not allowed when streaming ('stream' = true)"
        )

    params = _sampling_params(_sampling_dict(tensors, request_parameters))
    flags = frozenset(name for name in RETURN_FLAGS if _bool(tensors, name))
    client_logprobs = params.logprobs is not None
    changes: dict[str, Any] = {
        "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    }
    if "return_cumulative_logprob" in flags and params.logprobs is None:
        changes["logprobs"] = 0  # the sampled token's logprob is enough to sum
    return GenerateRequest(
        prompt=prompt,
        params=params.clone(**changes),
        stream=stream,
        prepend_input=prepend_input,
        flags=flags,
        client_logprobs=client_logprobs,
    )
