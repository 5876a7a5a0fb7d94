"""postprocessing: token ids -> text, for clients that hold token ids (e.g. the llm model's
non-streamed output_ids, or a TensorRT-LLM-style BLS pipeline).

It is deliberately not a step of the streaming ensemble: a stateless decode of each streamed
delta cannot be exact (a multi-byte character split across deltas becomes U+FFFD, and
SentencePiece tokenizers drop the leading space of every delta: TensorRT-LLM backend issues
#34, #112, #196). The llm model streams exact text deltas from the engine's incremental
detokenizer instead, and the ensemble routes those to its text_output.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagedserve.serving.trtllm import resolve_tokenizer_dir
from pagedserve.tokenizer.tokenizer import load_tokenizer


class TritonPythonModel:
    """Owns the tokenizer; one response per request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        value = config["parameters"]["tokenizer_dir"]["string_value"]
        self.tokenizer = load_tokenizer(resolve_tokenizer_dir(value, args["model_repository"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy()
            skip = pb_utils.get_input_tensor_by_name(request, "skip_special_tokens")
            skip = True if skip is None else bool(skip.as_numpy().reshape(-1)[0])
            text = self.tokenizer.decode(ids.reshape(-1).tolist(), skip_special_tokens=skip)
            output = np.array([text.encode("utf-8")], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", output)])
            )
        return responses
