"""preprocessing: a TensorRT-LLM request -> the llm model's input_ids and sampling_parameters.

Tokenizes text_input with the checkpoint's Hugging Face tokenizer (as the engine itself would,
special tokens included) and turns the TensorRT-LLM sampling inputs into the llm model's
sampling_parameters JSON, with TensorRT-LLM's semantics (pagedserve.serving.trtllm). Errors name
the input at fault and are INVALID_ARG; they go through pagedserve.serving.error_sender, which
keeps Triton 2.51's gRPC frontend from crashing on them.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.serving.error_sender import ErrorSender
from pagedserve.serving.trtllm import INPUT_NAMES, TrtllmTranslator, tokenizer_dir_parameter
from pagedserve.tokenizer.tokenizer import load_tokenizer


class TritonPythonModel:
    """Owns the tokenizer; one response per request, sent through the response sender so
    that an error can be held back (pagedserve.serving.error_sender)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        tokenizer = load_tokenizer(tokenizer_dir_parameter(config, args["model_repository"]))
        self.translator = TrtllmTranslator(tokenizer)
        self.errors = ErrorSender(pb_utils, pb_utils.Logger.log_error)

    def _outputs(self, request):
        tensors = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        translated = self.translator.translate(tensors)
        params = np.array([translated.sampling_json()], dtype=np.object_)
        input_ids = self.translator.encode(translated.prompt)
        return [pb_utils.Tensor("input_ids", input_ids),
                pb_utils.Tensor("sampling_parameters", params)]

    def execute(self, requests):
        self.errors.respond_each(requests, self._outputs)
        return None

    def finalize(self):
        self.errors.stop()
