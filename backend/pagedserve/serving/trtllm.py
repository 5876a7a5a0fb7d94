"""The TensorRT-LLM ensemble's request fields, translated to pagedserve's sampling parameters.

The ``ensemble`` model keeps TensorRT-LLM's input names so that its clients (and genai-perf's
``--backend tensorrtllm`` payload) work unchanged; ``preprocessing`` turns them into the
``sampling_parameters`` JSON of the llm model with the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pagedserve.sampling_params import SamplingParams
from pagedserve.serving.contract import InvalidRequest

# TensorRT-LLM scalar input -> SamplingParams field.
SCALAR_FIELDS: dict[str, str] = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "min_tokens": "min_tokens",
    "min_length": "min_tokens",  # TensorRT-LLM's older name, still sent by genai-perf
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Accepted for compatibility, without effect: padding does not exist in a streamed response.
IGNORED_FIELDS = ("pad_id",)


def _scalar(array: np.ndarray, name: str) -> Any:
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one element, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value


def _words(array: np.ndarray) -> list[str]:
    """A STRING[-1] word list; empty strings are padding (TensorRT-LLM clients send [""])."""
    words = []
    for item in np.asarray(array).reshape(-1):
        text = item.decode("utf-8") if isinstance(item, (bytes, np.bytes_)) else str(item)
        if text:
            words.append(text)
    return words


def sampling_parameters(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The llm model's sampling parameters for one ensemble request (name -> array)."""
    values: dict[str, Any] = {}
    for name, field in SCALAR_FIELDS.items():
        if name not in tensors:
            continue
        value = _scalar(tensors[name], name)
        if field in values and values[field] != value:
            raise InvalidRequest(
                f"inputs 'min_tokens' ({values[field]}) and 'min_length' ({value}) disagree; "
                "min_length is an alias of min_tokens"
            )
        values[field] = value
    if "stop_words" in tensors:
        stop = _words(tensors["stop_words"])
        if stop:
            values["stop"] = stop
    if "bad_words" in tensors and _words(tensors["bad_words"]):
        raise InvalidRequest("input 'bad_words' is not supported by the pagedserve engine")
    if "end_id" in tensors:
        values["stop_token_ids"] = [int(_scalar(tensors["end_id"], "end_id"))]
    try:  # checked here so that the error names the ensemble's input, not the llm's
        SamplingParams.from_dict(values)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return values


def sampling_parameters_json(tensors: Mapping[str, np.ndarray]) -> bytes:
    return json.dumps(sampling_parameters(tensors)).encode("utf-8")


def resolve_tokenizer_dir(value: str, model_dir: str) -> Path:
    """A ``tokenizer_dir`` parameter as a directory: relative to the model's directory, and
    when it holds a model.json (e.g. ``../llm/1``), the tokenizer of the checkpoint it names."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(model_dir) / path
    engine_args = path / "model.json"
    if engine_args.is_file():
        args = json.loads(engine_args.read_text())
        target = Path(args.get("tokenizer") or args.get("model", ""))
        path = target if target.is_absolute() else path / target
    return path.resolve()
