"""The launcher: which tritonserver it picks, the backend directory it prepares, its command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.serving import launcher


def _fake_install(root: Path, with_pagedserve: bool = False) -> Path:
    """A tritonserver installation tree (as in /opt/tritonserver) with empty files."""
    (root / "bin").mkdir(parents=True)
    binary = root / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py",
                 "triton_python_backend_stub"):
        (python / name).write_text(name)
    (root / "backends" / "onnxruntime").mkdir()
    if with_pagedserve:
        (root / "backends" / "pagedserve").mkdir()
        (root / "backends" / "pagedserve" / "model.py").write_text("")
    return binary


def test_finds_the_nvidia_pytriton_server_and_its_stub(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.setattr(launcher, "NGC_ROOT", tmp_path / "absent")
    install = launcher.find_tritonserver()
    assert install.origin == "nvidia-pytriton"
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert install.stub is not None and install.stub.parent.name == version
    assert any(d.name == "nvidia_pytriton.libs" for d in install.lib_dirs)


def test_path_comes_first(monkeypatch, tmp_path):
    binary = _fake_install(tmp_path / "triton")
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    install = launcher.find_tritonserver()
    assert install.origin == "PATH" and install.binary == binary
    assert install.backends_dir == (tmp_path / "triton" / "backends").resolve()


def test_prepared_backend_dir_has_python_backend_stub_and_pagedserve(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launcher, "NGC_ROOT", tmp_path / "absent")
    install = launcher.find_tritonserver()
    dest = launcher.prepare_backend_dir(install, tmp_path / "backends")
    python = dest / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py",
                 "triton_python_backend_stub"):
        # Copies: Triton rejects a backend library whose real path leaves the directory.
        assert (python / name).is_file() and not (python / name).is_symlink(), name
    assert (python / "triton_python_backend_stub").read_bytes() == install.stub.read_bytes()
    model_py = dest / "pagedserve" / "model.py"
    assert model_py.resolve() == launcher.backend_model_py().resolve()
    # Preparing again is a no-op that keeps the same layout.
    assert launcher.prepare_backend_dir(install, dest) == dest


def test_installation_with_pagedserve_is_used_as_is(tmp_path):
    binary = _fake_install(tmp_path / "opt", with_pagedserve=True)
    install = launcher._from_root("/opt/tritonserver", binary)
    assert launcher.prepare_backend_dir(install) == install.backends_dir


def test_other_backends_are_kept(tmp_path):
    binary = _fake_install(tmp_path / "opt")
    install = launcher._from_root("/opt/tritonserver", binary)
    dest = launcher.prepare_backend_dir(install, tmp_path / "prepared")
    assert (dest / "onnxruntime").resolve() == install.backends_dir / "onnxruntime"
    assert (dest / "pagedserve" / "model.py").is_file()


def test_server_command_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setattr(launcher, "NGC_ROOT", tmp_path / "absent")
    argv, env = launcher.server_command(["--model-repository", "/models", "--http-port", "1"])
    assert argv[1:5] == ["--model-repository", "/models", "--http-port", "1"]
    assert argv[5] == "--backend-directory"
    assert Path(argv[6]).parent == tmp_path / "cache"
    # The stub takes its packages from the first python on PATH: this interpreter's.
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    # A --backend-directory given by the user is kept.
    argv, _ = launcher.server_command(["--model-repository=/m", "--backend-directory=/b"])
    assert argv.count("--backend-directory=/b") == 1 and "--backend-directory" not in argv


def test_serve_without_a_repository_is_an_error():
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "serve", "--http-port", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--model-repository" in result.stderr


def test_install_backend_copies_model_py(tmp_path):
    target = launcher.install_backend(tmp_path / "backends")
    assert target == tmp_path / "backends" / "pagedserve" / "model.py"
    assert target.read_bytes() == launcher.backend_model_py().read_bytes()


@pytest.mark.parametrize("command", [["backend-dir"], ["env"]])
def test_cli_subcommands(command, tmp_path):
    env = dict(os.environ, PAGEDSERVE_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", *command],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
