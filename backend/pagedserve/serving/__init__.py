"""Triton-side helpers of the pagedserve backend (backend/pagedserve/model.py), its launcher,
and the Python models of the shipped repository.

contract (tensor contract, request parsing), responses (output tensors), handler (one request's
coroutine), responder (response thread, cancellation polling), event_loop, metrics, watchdog,
launcher (``pagedserve serve``); error_sender (rejections Triton 2.51 survives); trtllm
(TensorRT-LLM's request fields), trtllm_outputs (its responses), trtllm_bls (the
tensorrt_llm_bls model), abort_channel (how it stops its llm requests).
"""
