"""tensorrt_llm_bls: TensorRT-LLM's request -> the llm model (BLS) -> TensorRT-LLM's responses.

The work is in pagedserve.serving.trtllm_bls; see there for the threads and the cancellation.
"""

import json

import triton_python_backend_utils as pb_utils

from pagedserve.serving.trtllm import TrtllmTranslator, tokenizer_dir_parameter, words_tokenizer
from pagedserve.serving.trtllm_bls import TrtllmBls


class TritonPythonModel:
    """Owns this instance's BLS runtime: its tokenizer, the request in progress, the
    cancellation and error threads."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError("tensorrt_llm_bls streams: its config.pbtxt must set "
                             "model_transaction_policy { decoupled: true }")
        tokenizer = words_tokenizer(tokenizer_dir_parameter(config, args["model_repository"]))
        llm = config["parameters"].get("tensorrt_llm_model_name", {}).get("string_value") or "llm"
        self.bls = TrtllmBls(pb_utils, TrtllmTranslator(tokenizer), llm, pb_utils.Logger.log_error)

    def execute(self, requests):
        self.bls.execute(requests)

    def finalize(self):
        self.bls.finalize()
