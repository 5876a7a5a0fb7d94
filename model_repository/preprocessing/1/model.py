"""preprocessing: a TensorRT-LLM request -> the llm model's input_ids and sampling_parameters.

Tokenizes text_input with the checkpoint's Hugging Face tokenizer (as the engine itself would,
special tokens included) and turns the TensorRT-LLM sampling inputs into the llm model's
sampling_parameters JSON, with TensorRT-LLM's semantics (pagedserve.serving.trtllm). Errors name
the input at fault and are INVALID_ARG.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.trtllm import INPUT_NAMES, TrtllmTranslator, tokenizer_dir_parameter
from pagedserve.tokenizer.tokenizer import load_tokenizer


class TritonPythonModel:
    """Owns the tokenizer; one final response per request (decoupled: see config.pbtxt)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        tokenizer = load_tokenizer(tokenizer_dir_parameter(config, args["model_repository"]))
        self.translator = TrtllmTranslator(tokenizer)

    def _response(self, request):
        tensors = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        try:
            translated = self.translator.translate(tensors)
        except InvalidRequest as e:
            error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=error)
        params = np.array([translated.sampling_json()], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", translated.input_ids),
            pb_utils.Tensor("sampling_parameters", params),
        ])

    def execute(self, requests):
        for request in requests:
            request.get_response_sender().send(
                self._response(request), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
