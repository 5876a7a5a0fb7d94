"""TensorRT-LLM's request fields, translated for pagedserve's llm model.

``tensorrt_llm_bls`` (and the ``ensemble`` in front of it) keep the input names, types and
semantics of TensorRT-LLM's inflight_batcher_llm models, so that its clients (its
end_to_end_grpc_client.py, genai-perf's ``--backend tensorrtllm``) work unchanged;
``preprocessing`` offers the same translation as a model of its own. What TensorRT-LLM does and
pagedserve follows:

* no ``top_k`` and no ``top_p`` (or both 0) is greedy, whatever ``temperature`` says; ``top_k``
  alone samples from the top k, ``top_p`` 0 is "not given";
* ``end_id`` replaces the tokenizer's EOS as the one token that ends a completion, and -1 means
  no such token (the completion runs to ``max_tokens``);
* ``num_return_sequences`` is ``n``; ``beam_width`` must be 1 (no beam search here);
* ``bad_words`` are banned, ``embedding_bias_words``/``_weights`` add each weight to the logits
  of the word's tokens;
* streaming answers with the new text only, even with ``exclude_input_in_output`` false.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from pagedserve.sampling_params import SamplingParams
from pagedserve.serving.contract import InvalidRequest, scalar_input, text_value

# TensorRT-LLM input -> SamplingParams field, passed through as given.
SCALAR_FIELDS: dict[str, str] = {
    "max_tokens": "max_tokens",
    "num_return_sequences": "n",
    "seed": "seed",
    "min_tokens": "min_tokens",
    "min_length": "min_tokens",  # TensorRT-LLM's older name, still sent by genai-perf
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Sampling inputs with TensorRT-LLM's own defaults (greedy unless top_k or top_p is given).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
WORD_LISTS = ("stop_words", "bad_words", "embedding_bias_words")
# Accepted without effect: padding does not exist in a streamed response, and the length
# penalty only shapes beam search.
IGNORED_FIELDS = ("pad_id", "length_penalty")
# Outputs pagedserve cannot produce: asking for them is an error, not asking is fine.
UNSUPPORTED_FLAGS = ("return_context_logits", "return_generation_logits", "return_perf_metrics")
RESPONSE_FLAGS = ("return_log_probs", "return_num_input_tokens", "return_num_output_tokens")

# Every input the translation reads (the models' config.pbtxt declare their types).
INPUT_NAMES: tuple[str, ...] = (
    "text_input", "stream", "exclude_input_in_output", "beam_width", "end_id",
    "embedding_bias_weights", *SCALAR_FIELDS, *SAMPLING_FIELDS, *WORD_LISTS,
    *IGNORED_FIELDS, *UNSUPPORTED_FLAGS, *RESPONSE_FLAGS,
)


@dataclass
class TrtllmRequest:
    """One TensorRT-LLM request (one batch item), translated for the llm model."""

    prompt: str
    sampling: dict[str, Any]  # the llm model's sampling_parameters
    stream: bool
    exclude_input: bool  # a non-streamed text_output without the prompt in front
    return_log_probs: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool

    @property
    def n(self) -> int:
        return int(self.sampling.get("n", 1))

    def sampling_json(self) -> bytes:
        return json.dumps(self.sampling).encode("utf-8")


def _flag(tensors: Mapping[str, np.ndarray], name: str) -> bool:
    return name in tensors and bool(scalar_input(tensors[name], name))


def _words(tensors: Mapping[str, np.ndarray], name: str) -> list[str]:
    """A STRING[-1] word list; empty strings are padding (TensorRT-LLM clients send [""])."""
    if name not in tensors:
        return []
    return [text_value(item, name) for item in np.asarray(tensors[name]).reshape(-1)]


def _finite(value: Any, name: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"input '{name}' must be a finite number, got {value}")
    return value


def batch_size(tensors: Mapping[str, np.ndarray]) -> int:
    """The batch size of a request to a model with max_batch_size > 0 (the first dimension,
    the same for every input)."""
    sizes = {name: np.asarray(array).shape[0] for name, array in tensors.items()}
    if not sizes:
        raise InvalidRequest("the request has no inputs: give at least 'text_input' and "
                             "'max_tokens'")
    if len(set(sizes.values())) != 1:
        raise InvalidRequest(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def split_batch(tensors: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One name -> array mapping per batch item, the batch dimension removed."""
    return [{name: np.asarray(array)[i] for name, array in tensors.items()}
            for i in range(batch_size(tensors))]


class TrtllmTranslator:
    """Owns the tokenizer, and turns one TensorRT-LLM request's tensors into an llm request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer  # the checkpoint's: HF's, or a RustTokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        """The prompt's token ids, special tokens included, as the engine tokenizes it (with
        HF's tokenizer: its post-processing follows tokenizer_config.json too)."""
        return np.asarray(self.tokenizer(text).input_ids, dtype=np.int32)

    def translate(self, tensors: Mapping[str, np.ndarray]) -> TrtllmRequest:
        """``tensors``: name -> array of one request (one batch item, no batch dimension)."""
        if "text_input" not in tensors:
            raise InvalidRequest("input 'text_input' is required")
        prompt = text_value(scalar_input(tensors["text_input"], "text_input"), "text_input")
        if not prompt:
            raise InvalidRequest("input 'text_input' is empty")
        sampling = self.sampling_parameters(tensors)
        stream = _flag(tensors, "stream")
        return TrtllmRequest(
            prompt=prompt,
            sampling=sampling,
            stream=stream,
            exclude_input=_flag(tensors, "exclude_input_in_output"),
            return_log_probs=_flag(tensors, "return_log_probs"),
            return_num_input_tokens=_flag(tensors, "return_num_input_tokens"),
            return_num_output_tokens=_flag(tensors, "return_num_output_tokens"),
        )

    def sampling_parameters(self, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The llm model's sampling parameters for one request (name -> array)."""
        if "max_tokens" not in tensors:
            raise InvalidRequest("input 'max_tokens' is required")
        for name in UNSUPPORTED_FLAGS:
            if _flag(tensors, name):
                raise InvalidRequest(f"input '{name}' = true is not supported by pagedserve")
        if "beam_width" in tensors and scalar_input(tensors["beam_width"], "beam_width") != 1:
            raise InvalidRequest(
                f"input 'beam_width' must be 1 (pagedserve has no beam search), got "
                f"{scalar_input(tensors['beam_width'], 'beam_width')}; use 'num_return_sequences' "
                "for several completions"
            )
        values: dict[str, Any] = {}
        for name, field in SCALAR_FIELDS.items():
            if name not in tensors:
                continue
            value = _finite(scalar_input(tensors[name], name), name)
            if field in values and values[field] != value:
                raise InvalidRequest(
                    f"inputs 'min_tokens' ({values[field]}) and 'min_length' ({value}) "
                    "disagree; min_length is an alias of min_tokens"
                )
            values[field] = value
        given = {name: _finite(scalar_input(tensors[name], name), name)
                 for name in SAMPLING_FIELDS if name in tensors}
        self._sampling(given, values)
        stop = [w for w in _words(tensors, "stop_words") if w]
        if stop:
            values["stop"] = stop
        bad = [w for w in _words(tensors, "bad_words") if w]
        if bad:
            values["bad_words"] = bad
        bias = self._logit_bias(tensors)
        if bias:
            values["logit_bias"] = bias
        if "end_id" in tensors:
            self._end_id(scalar_input(tensors["end_id"], "end_id"), values)
        if _flag(tensors, "return_log_probs"):
            values["logprobs"] = 0  # the sampled token's log probability
        # Checked here so that a bad value is an error even where TensorRT-LLM's rules ignore
        # it (a temperature without top_k/top_p), and names TensorRT-LLM's input.
        checked = {**values, **{k: v for k, v in given.items() if (k, v) != ("top_p", 0)}}
        try:
            SamplingParams.from_dict(checked)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return values

    @staticmethod
    def _sampling(given: dict[str, Any], values: dict[str, Any]) -> None:
        """TensorRT-LLM samples only when top_k or top_p asks for it (both 0: greedy)."""
        top_k, top_p = given.get("top_k", 0), given.get("top_p", 0.0)
        if top_p < 0:  # 0 means "not given", as in TensorRT-LLM; below that is an error
            raise InvalidRequest(f"input 'top_p' must be in [0, 1] (0: off), got {top_p}")
        if top_k <= 0 and top_p == 0:
            values["temperature"] = 0.0
            return
        values["temperature"] = given.get("temperature", 1.0)
        if top_k > 0:
            values["top_k"] = top_k
        if top_p > 0:
            values["top_p"] = top_p

    def _end_id(self, end_id: int, values: dict[str, Any]) -> None:
        """TensorRT-LLM's end_id is the only token that ends a completion (-1: none)."""
        if not -1 <= end_id < self.vocab_size:
            raise InvalidRequest(
                f"input 'end_id' must be -1 (none) or a token id below {self.vocab_size}, "
                f"got {end_id}"
            )
        values["ignore_eos"] = True
        if end_id >= 0:
            values["stop_token_ids"] = [end_id]

    def _logit_bias(self, tensors: Mapping[str, np.ndarray]) -> dict[int, float]:
        words = _words(tensors, "embedding_bias_words")
        weights = (np.asarray(tensors["embedding_bias_weights"], dtype=np.float64).reshape(-1)
                   if "embedding_bias_weights" in tensors else np.zeros(0))
        if not any(words) and not weights.any():
            return {}
        if len(words) != len(weights):
            raise InvalidRequest(
                f"inputs 'embedding_bias_words' ({len(words)}) and 'embedding_bias_weights' "
                f"({len(weights)}) must have the same length"
            )
        bias: dict[int, float] = {}
        for word, weight in zip(words, weights.tolist()):
            if not word:
                continue  # padding
            _finite(weight, "embedding_bias_weights")
            for token in self.tokenizer(word, add_special_tokens=False).input_ids:
                bias[token] = bias.get(token, 0.0) + weight
        return bias


class RustTokenizer:
    """A checkpoint's tokenizer.json through the tokenizers library alone: token ids of words
    and the vocabulary size, which is all tensorrt_llm_bls needs, without transformers (which
    loads torch: ~300 MB more in each of its instances). The llm model tokenizes prompts."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return SimpleNamespace(input_ids=encoding.ids)


def words_tokenizer(path: Path) -> Any:
    """The tokenizer tensorrt_llm_bls needs: a RustTokenizer where the checkpoint has a
    tokenizer.json, else HF's (which transformers builds from e.g. a SentencePiece model)."""
    if (path / "tokenizer.json").is_file():
        return RustTokenizer(path)
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(path)


def resolve_tokenizer_dir(value: str, model_dir: str) -> Path:
    """A ``tokenizer_dir`` parameter as a directory: relative to the model's directory, and
    when it holds a model.json (e.g. ``../llm/1``), the tokenizer of the checkpoint it names
    (a directory, or a hub id in the local Hugging Face cache, as the engine resolves it)."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(model_dir) / path
    engine_args = path / "model.json"
    if engine_args.is_file():
        args = json.loads(engine_args.read_text())
        name = args.get("tokenizer") or args.get("model", "")
        target = Path(name) if Path(name).is_absolute() else path / name
        if not target.is_dir():  # a hub id, found in the local cache as the engine finds it
            from pagedserve.models.hub import resolve_checkpoint

            target = resolve_checkpoint(
                name, what="tokenizer",
                revision=args.get("tokenizer_revision") or args.get("revision"),
                download_dir=args.get("download_dir"),
            )
        path = target
    return path.resolve()


def tokenizer_dir_parameter(model_config: Mapping[str, Any], model_dir: str) -> Path:
    """The ``tokenizer_dir`` parameter of a Python model's config, resolved."""
    value = model_config.get("parameters", {}).get("tokenizer_dir", {}).get("string_value")
    if not value:
        raise ValueError(f"model '{model_config.get('name')}': parameter 'tokenizer_dir' is "
                         "missing from config.pbtxt")
    return resolve_tokenizer_dir(value, model_dir)

