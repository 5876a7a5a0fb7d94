"""A test hook: make a real step of the real engine fail, on demand.

``PAGEDSERVE_FAULT_INJECT_FILE=/some/path`` (read once, when an engine starts) arms it: while
armed, each step first checks whether that file exists, and if it does, removes it and raises
``InjectedFault`` from inside the model runner, after the step was scheduled, as a failure no
request explains would. The fault tests use it to kill an engine under load (``touch`` the
file) and to check that it is noticed and recovered from; removing the file first makes the
fault fire once, so the rebuilt engine runs on. Unset, nothing is installed and steps cost
nothing more.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

ENV_VAR = "PAGEDSERVE_FAULT_INJECT_FILE"

logger = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The failure raised by the test hook."""


def arm_fault_injection(runner: Any) -> None:
    """Installs the hook on ``runner`` (a ModelRunner) when ``PAGEDSERVE_FAULT_INJECT_FILE``
    is set; does nothing otherwise."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    logger.warning("pagedserve: %s=%s arms the fault-injection test hook", ENV_VAR, path)
    launch = runner.launch

    @functools.wraps(launch)
    def launch_or_fail(sched: Any) -> Any:
        if os.path.exists(path) and sched.total_num_scheduled_tokens:
            os.remove(path)
            raise InjectedFault(f"fault injected by the test hook ({ENV_VAR}={path})")
        return launch(sched)

    # An instance attribute shadows the method: execute_model's self.launch goes through it.
    runner.launch = launch_or_fail
