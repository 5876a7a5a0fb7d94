"""preprocessing: the TensorRT-LLM ensemble's request -> the llm model's input_ids and sampling.

Tokenizes text_input with the checkpoint's Hugging Face tokenizer (as the engine itself would,
special tokens included) and turns the TensorRT-LLM sampling inputs into the llm model's
sampling_parameters JSON. Errors name the input at fault and are INVALID_ARG.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.trtllm import SCALAR_FIELDS, resolve_tokenizer_dir, sampling_parameters_json
from pagedserve.tokenizer.tokenizer import load_tokenizer

_OPTIONAL = (*SCALAR_FIELDS, "stop_words", "bad_words", "end_id", "pad_id")


class TritonPythonModel:
    """Owns the tokenizer; one response per request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        value = config["parameters"]["tokenizer_dir"]["string_value"]
        self.tokenizer = load_tokenizer(resolve_tokenizer_dir(value, args["model_repository"]))

    def _one(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        if text.size != 1:
            raise InvalidRequest(f"input 'text_input' must hold one string, got {text.size}")
        prompt = text[0].decode("utf-8") if isinstance(text[0], bytes) else str(text[0])
        if not prompt:
            raise InvalidRequest("input 'text_input' is empty")
        tensors = {}
        for name in _OPTIONAL:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        ids = np.asarray(self.tokenizer(prompt).input_ids, dtype=np.int32)
        params = np.array([sampling_parameters_json(tensors)], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", ids),
                pb_utils.Tensor("sampling_parameters", params),
            ]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except (InvalidRequest, UnicodeDecodeError) as e:
                error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
