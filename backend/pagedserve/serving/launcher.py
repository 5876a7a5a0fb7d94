"""Finds a tritonserver, prepares a backend directory that holds pagedserve, and starts it.

Three kinds of installation are supported, tried in this order:

* a ``tritonserver`` on ``PATH`` (its ``backends/`` sits beside its ``bin/``),
* ``/opt/tritonserver`` (the NGC image),
* the server bundled in the ``nvidia-pytriton`` wheel, which ships the python backend without a
  stub in place and one stub per Python version beside it.

A Python-based backend is found by Triton as ``<backend-dir>/pagedserve/model.py`` and run with
the python backend from ``<backend-dir>/python/``, so the prepared directory holds links to the
installation's backends, the stub built for the running Python, and ``pagedserve/model.py``.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pagedserve.serving.supervisor import ServerSupervisor, SupervisorConfig

NGC_ROOT = Path("/opt/tritonserver")
BACKEND_NAME = "pagedserve"
_STUB = "triton_python_backend_stub"


class LauncherError(RuntimeError):
    """tritonserver or one of its parts cannot be found."""


@dataclass(frozen=True)
class TritonInstall:
    """Where one tritonserver installation keeps its binary, backends and shared libraries."""

    origin: str  # "PATH", "/opt/tritonserver" or "nvidia-pytriton"
    binary: Path
    backends_dir: Path
    # Set where backends/python/ has no stub of its own (the nvidia-pytriton wheel).
    stub: Optional[Path]
    lib_dirs: tuple[Path, ...]

    def has_pagedserve(self) -> bool:
        """Whether the installation's own backends/ already holds pagedserve (the Docker image)."""
        return (self.backends_dir / BACKEND_NAME / "model.py").is_file() and (
            self.backends_dir / "python" / _STUB
        ).is_file()


def _from_root(origin: str, binary: Path) -> TritonInstall:
    root = binary.resolve().parent.parent
    backends = root / "backends"
    if not (backends / "python" / "libtriton_python.so").is_file():
        raise LauncherError(f"{binary} has no python backend in {backends / 'python'}")
    lib_dirs = tuple(d for d in (root / "lib",) if d.is_dir())
    return TritonInstall(origin, binary, backends, None, lib_dirs)


def _from_pytriton() -> Optional[TritonInstall]:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise LauncherError(
            f"nvidia-pytriton at {package} has no python backend stub for Python {version}"
        )
    # auditwheel put the server's own libraries (libtritonserver, libb64, ...) here.
    libs = package.parent / "nvidia_pytriton.libs"
    lib_dirs = tuple(d for d in (libs,) if d.is_dir())
    return TritonInstall("nvidia-pytriton", binary, root / "backends", stub, lib_dirs)


def find_tritonserver() -> TritonInstall:
    """The first tritonserver found on PATH, in /opt/tritonserver, or in nvidia-pytriton."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return _from_root("PATH", Path(on_path))
    if (NGC_ROOT / "bin" / "tritonserver").is_file():
        return _from_root(str(NGC_ROOT), NGC_ROOT / "bin" / "tritonserver")
    install = _from_pytriton()
    if install is None:
        raise LauncherError(
            "no tritonserver found: not on PATH, not in /opt/tritonserver, and the "
            "nvidia-pytriton wheel is not installed (pip install 'pagedserve[triton]')"
        )
    return install


def backend_model_py() -> Path:
    """The backend's model.py inside the installed pagedserve package."""
    spec = importlib.util.find_spec("pagedserve")
    if spec is None or not spec.submodule_search_locations:
        raise LauncherError("the pagedserve package cannot be found")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    if not path.is_file():
        raise LauncherError(f"{path} is missing")
    return path


def default_cache_dir() -> Path:
    if os.environ.get("PAGEDSERVE_CACHE_DIR"):
        return Path(os.environ["PAGEDSERVE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pagedserve"


def _link(target: Path, link: Path) -> None:
    """Points ``link`` at ``target``, atomically, so concurrent launchers never see a gap."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _copy(source: Path, dest: Path) -> None:
    """Copies ``source`` to ``dest`` atomically unless an identical copy is already there.

    Files, not links: Triton refuses a backend library whose real path escapes the backend
    directory.
    """
    st = source.stat()
    if dest.is_file() and not dest.is_symlink():
        dt = dest.stat()
        if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
            return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, dest)


def prepare_backend_dir(install: TritonInstall, dest: Optional[Path] = None) -> Path:
    """A backend directory with the installation's backends, the right stub and pagedserve.

    The installation's own directory is returned as is when it already holds pagedserve.
    Otherwise ``dest`` (by default a directory in the cache, one per installation and Python)
    is filled: the python backend and the stub are copied, other backends are linked, and
    ``pagedserve/model.py`` is a link, so edits to the package's model.py take effect on the
    next start.
    """
    if dest is None and install.stub is None and install.has_pagedserve():
        return install.backends_dir
    if dest is None:
        key = f"{install.binary.resolve()}|{sys.executable}|{backend_model_py()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        dest = default_cache_dir() / f"triton-backends-{digest}"
    dest = Path(dest)
    (dest / "python").mkdir(parents=True, exist_ok=True)
    (dest / BACKEND_NAME).mkdir(exist_ok=True)
    for entry in install.backends_dir.iterdir():
        if entry.name in ("python", BACKEND_NAME) or entry.name.startswith("__"):
            continue
        _link(entry.resolve(), dest / entry.name)
    for entry in (install.backends_dir / "python").iterdir():
        if entry.name.startswith("__"):
            continue
        if entry.is_file():
            _copy(entry, dest / "python" / entry.name)
    if install.stub is not None:
        _copy(install.stub, dest / "python" / _STUB)
    if not (dest / "python" / _STUB).exists():
        raise LauncherError(f"{install.backends_dir / 'python'} has no {_STUB}")
    _link(backend_model_py().resolve(), dest / BACKEND_NAME / "model.py")
    return dest


def install_backend(backends_dir: Path) -> Path:
    """Copies model.py to ``<backends_dir>/pagedserve/model.py`` (for images and packagers)."""
    target = Path(backends_dir) / BACKEND_NAME / "model.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backend_model_py(), target)
    return target


def _prepend(env: dict[str, str], name: str, dirs: Sequence[str]) -> None:
    parts = [d for d in dirs if d] + [p for p in env.get(name, "").split(os.pathsep) if p]
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    env[name] = os.pathsep.join(seen)


def _libpython_dir() -> str:
    """The directory of this interpreter's shared libpython, which the python stub links."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if soname and os.path.isfile(os.path.join(libdir, soname)):
        return libdir
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ctypes.util.find_library(f"python{version}"):
        return ""  # found by the dynamic loader's default paths
    raise LauncherError(
        f"no shared libpython{version} found (the python backend stub links it): install "
        f"libpython{version} (apt) or use a Python built with --enable-shared"
    )


def server_environment(install: TritonInstall, base: Optional[dict[str, str]] = None) -> dict:
    """The environment tritonserver and its python stubs need.

    The stub embeds libpython and takes its ``sys.path`` (so pagedserve, torch, numpy) from the
    ``python`` first on PATH: the running interpreter's directory goes first, not resolved, so a
    virtual environment's ``bin/`` is what the stub sees.
    """
    env = dict(os.environ if base is None else base)
    lib_dirs = [str(d) for d in install.lib_dirs]
    if install.stub is not None:  # a stub we picked must find this interpreter's libpython
        lib_dirs.append(_libpython_dir())
    _prepend(env, "LD_LIBRARY_PATH", lib_dirs)
    _prepend(env, "PATH", [os.path.dirname(os.path.abspath(sys.executable))])
    return env


def _has_option(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _option_value(args: Sequence[str], name: str) -> Optional[str]:
    """The last value given to ``--name=V`` or ``--name V``, None when absent."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def server_command(
    args: Sequence[str], install: Optional[TritonInstall] = None
) -> tuple[list[str], dict[str, str]]:
    """The tritonserver argv and environment for ``pagedserve serve ARGS``."""
    install = install or find_tritonserver()
    argv = [str(install.binary), *args]
    if not _has_option(args, "--backend-directory"):
        argv += ["--backend-directory", str(prepare_backend_dir(install))]
    return argv, server_environment(install)


def exec_server(args: Sequence[str]) -> None:
    """Replaces this process with tritonserver (signals then reach the server directly)."""
    _check_repository(args)
    argv, env = server_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def _check_repository(args: Sequence[str]) -> None:
    if not (_has_option(args, "--model-repository") or _has_option(args, "--model-store")):
        raise LauncherError("pagedserve serve needs --model-repository DIR")


def supervised_args(args: Sequence[str]) -> tuple[list[str], Optional[SupervisorConfig]]:
    """The tritonserver options to run under the supervisor, and its configuration (None when
    the server's HTTP endpoint, which the supervisor talks to, is turned off).

    Without a ``--model-control-mode`` the server runs in explicit mode with every model
    loaded (what the default mode loads), so that a failed model can be loaded again; with
    ``none`` or ``poll`` a failed model is recovered by restarting its engine or the server.
    """
    args = list(args)
    if (_option_value(args, "--allow-http") or "true").lower() in ("false", "0", "no"):
        return args, None
    mode = _option_value(args, "--model-control-mode")
    if mode is None:
        args.append("--model-control-mode=explicit")
        if not _has_option(args, "--load-model"):
            args.append("--load-model=*")
        mode = "explicit"
    address = _option_value(args, "--http-address") or "0.0.0.0"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    if ":" in host:
        host = f"[{host}]"
    port = _option_value(args, "--http-port") or "8000"
    return args, SupervisorConfig(f"http://{host}:{port}", model_control=mode == "explicit")


def serve(args: Sequence[str]) -> int:
    """``pagedserve serve``: runs tritonserver under the supervisor (serving/supervisor.py)
    and returns its exit status; with ``PAGEDSERVE_SUPERVISE=0``, or without an HTTP
    endpoint, execs tritonserver instead."""
    _check_repository(args)
    server_args, config = supervised_args(args)
    if config is None or os.environ.get("PAGEDSERVE_SUPERVISE", "1") == "0":
        if config is None:
            print("pagedserve: HTTP is off, so tritonserver runs unsupervised", file=sys.stderr)
        exec_server(args)
    argv, env = server_command(server_args)
    return ServerSupervisor(argv, env, config).run()
