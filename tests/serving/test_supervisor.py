"""`pagedserve serve` under its supervisor: the options it gives tritonserver, and what it does
when the server cannot start. (What it does after faults: test_faults.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pagedserve.serving.launcher import supervised_args
from pagedserve.serving.supervisor import SupervisorConfig


def test_no_control_mode_means_explicit_with_every_model_loaded():
    args, config = supervised_args(["--model-repository", "/m", "--http-port", "9000"])
    assert args[-2:] == ["--model-control-mode=explicit", "--load-model=*"]
    assert config.http_url == "http://127.0.0.1:9000" and config.model_control


def test_the_users_choices_are_kept():
    args, config = supervised_args(
        ["--model-repository=/m", "--model-control-mode=poll", "--http-address", "10.1.2.3"]
    )
    assert args == ["--model-repository=/m", "--model-control-mode=poll", "--http-address",
                    "10.1.2.3"]
    assert config.http_url == "http://10.1.2.3:8000" and not config.model_control
    # --load-model without a mode: explicit is added, the user's model list kept.
    args, config = supervised_args(["--model-repository=/m", "--load-model", "llm"])
    assert args[-1] == "--model-control-mode=explicit" and "--load-model=*" not in args
    assert config.model_control
    _, config = supervised_args(["--model-repository=/m", "--http-address=::"])
    assert config.http_url == "http://[::1]:8000"


def test_without_http_there_is_no_supervisor():
    args, config = supervised_args(["--model-repository=/m", "--allow-http=false"])
    assert config is None and args == ["--model-repository=/m", "--allow-http=false"]


@pytest.mark.parametrize("field, value", [("poll_interval_s", 0), ("max_restarts", -1),
                                          ("load_attempts", 0), ("load_timeout_s", -5)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SupervisorConfig("http://127.0.0.1:8000", True, **{field: value})


@pytest.mark.triton_server
def test_a_server_that_cannot_start_ends_serve_with_its_status(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "serve",
         "--model-repository", str(tmp_path / "missing"), "--http-port", "1",
         "--grpc-port", "2", "--metrics-port", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0, result.stderr
    assert "starting it again" not in result.stderr
    assert time.monotonic() - started < 120
