"""Triton-side helpers of the pagedserve backend (backend/pagedserve/model.py) and its launcher.

contract (tensor contract, request parsing), responses (output tensors), handler (one request's
coroutine), responder (response thread, cancellation polling), event_loop, metrics, watchdog,
trtllm (the TensorRT-LLM ensemble's fields), launcher (``pagedserve serve``).
"""
