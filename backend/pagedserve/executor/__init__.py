"""The executor seam between LLMEngine and the model runners: the engine schedules once and
hands each step to an Executor, which runs it on every tensor-parallel rank (uni: one rank in
this process; mp: rank 0 here, the others in worker processes; ray: rank 0 here, the others in
Ray actors, on any node of a Ray cluster) and returns rank 0's tokens."""

from pagedserve.executor.base import Executor
from pagedserve.executor.factory import make_executor

__all__ = ["Executor", "make_executor"]
