"""pagedserve: a paged-KV, continuously batching LLM engine that serves through NVIDIA Triton."""

from pagedserve.config import EngineArgs
from pagedserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineArgs",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]


def __getattr__(name: str):
    # The engine pulls in torch and transformers; load it only when asked for, so that
    # lightweight users (the Triton launcher, the tokenizer models) stay fast to import.
    if name == "LLM":
        from pagedserve.entrypoints.llm import LLM

        return LLM
    if name == "AsyncLLMEngine":
        from pagedserve.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
