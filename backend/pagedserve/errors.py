"""The engine's two kinds of failure: one request's, and the whole engine's.

A failure raised while one request's own work runs inside a step (its sampling setup, its
sampling, its output processing) belongs to that request: it ends with a ``RequestError`` and
every other request goes on. Anything else stops the engine (``EngineDeadError``): its state
can no longer be trusted, so every request in flight fails and the engine must be rebuilt.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine stopped on an error that no single request explains; no request can make
    progress until it is rebuilt. Holds only the message, not the original exception, so that
    a dead engine's memory is not kept alive through a traceback."""


class RequestError(RuntimeError):
    """A failure that belongs to one request: only that request ends, with this error.

    ``stage`` says which of the request's own work failed ("sampling setup", "sampling",
    "output processing"); the original exception is ``__cause__``.
    """

    def __init__(self, request_id: str, stage: str, cause: BaseException) -> None:
        super().__init__(
            f"request {request_id!r} failed in {stage}: {type(cause).__name__}: {cause}"
        )
        self.request_id = request_id
        self.stage = stage
        self.__cause__ = cause

    def for_request(self, request_id: str) -> RequestError:
        """The same failure, named after ``request_id`` (a completion's parent request)."""
        if request_id == self.request_id:
            return self
        return type(self)(request_id, self.stage, self.__cause__)

    def __reduce__(self):
        return type(self), (self.request_id, self.stage, self.__cause__)


class RequestParamsError(RequestError, ValueError):
    """A RequestError raised where only the request's own sampling parameters are read (the
    setup of its sampling state): bad input that validation let through. A ValueError, so that
    servers answer it as bad input."""
