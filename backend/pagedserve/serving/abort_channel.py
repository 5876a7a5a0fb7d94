"""Aborting an llm request by its Triton request id, for the BLS model that issued it.

A BLS model cannot cancel the requests it sends in Triton 2.51: python_backend's
``ResponseIterator.cancel()`` arrived in r25.05, and cancelling the BLS model's own request
reaches nothing downstream. So ``tensorrt_llm_bls`` gives each llm request an unguessable
Triton request id, and when its own client cancels it sends the llm model a request with the
request parameter ``pagedserve_abort`` set to that id; the llm model aborts the request in the
engine, as if its client had cancelled it, and answers with an empty final response.
"""

from __future__ import annotations

import json
import uuid
import weakref
from typing import Any, Optional

ABORT_PARAMETER = "pagedserve_abort"
# Only ids with this prefix are registered: they come from new_request_id(), so a client cannot
# guess another client's, and other requests cost nothing here.
REQUEST_ID_PREFIX = "pagedserve-bls-"


def new_request_id() -> str:
    return REQUEST_ID_PREFIX + uuid.uuid4().hex


def abort_target(parameters: str) -> Optional[str]:
    """The request id an abort request names, or None for any other request (``parameters``:
    the request's parameters as JSON, as python_backend gives them)."""
    if ABORT_PARAMETER not in parameters:  # the common case, without parsing
        return None
    try:
        target = json.loads(parameters).get(ABORT_PARAMETER)
    except (json.JSONDecodeError, AttributeError):
        return None
    return target if isinstance(target, str) else None


class AbortRegistry:
    """Owns the map from BLS-issued Triton request ids to the llm's in-flight request states.

    Entries are weak: a request's state goes away once its final response is sent, and with it
    its entry, so nothing has to unregister.
    """

    def __init__(self) -> None:
        self._states: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def register(self, request_id: str, state: Any) -> bool:
        """Registers a BLS-issued request; returns whether it is one."""
        if not request_id.startswith(REQUEST_ID_PREFIX):
            return False
        self._states[request_id] = state
        return True

    def pop(self, request_id: str) -> Optional[Any]:
        return self._states.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._states)
