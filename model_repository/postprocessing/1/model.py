"""postprocessing: token ids -> text, for clients that hold token ids (e.g. the llm model's
non-streamed output_ids).

It is deliberately not a step of the TensorRT-LLM entry points: a stateless decode of each
streamed delta cannot be exact (a multi-byte character split across deltas becomes U+FFFD, and
SentencePiece tokenizers drop the leading space of every delta: TensorRT-LLM backend issues
#34, #112, #196). The llm model streams exact text deltas from the engine's incremental
detokenizer instead, and tensorrt_llm_bls passes those on.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.error_sender import ErrorSender
from pagedserve.serving.trtllm import tokenizer_dir_parameter
from pagedserve.tokenizer.tokenizer import load_tokenizer


class TritonPythonModel:
    """Owns the tokenizer; one response per request, sent through the response sender so
    that an error can be held back (pagedserve.serving.error_sender)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer = load_tokenizer(tokenizer_dir_parameter(config, args["model_repository"]))
        self.vocab_size = len(self.tokenizer)
        self.errors = ErrorSender(pb_utils, pb_utils.Logger.log_error)

    def _outputs(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InvalidRequest(f"input 'output_ids' holds token ids outside the vocabulary "
                                 f"[0, {self.vocab_size}): {ids.min()}..{ids.max()}")
        skip = pb_utils.get_input_tensor_by_name(request, "skip_special_tokens")
        skip = True if skip is None else bool(skip.as_numpy().reshape(-1)[0])
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=skip)
        return [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]

    def execute(self, requests):
        self.errors.respond_each(requests, self._outputs)
        return None

    def finalize(self):
        self.errors.stop()
