"""The package layout and the import rules between layers (tests/layering.py), and proof that
the rules catch what they forbid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from layering import violations

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("backend", "kernels")


def test_the_project_keeps_its_layers():
    assert violations([ROOT / r for r in SOURCE_ROOTS]) == []


# (file, line appended to it, what the report must say)
BROKEN = [
    ("backend/pagedserve/core/scheduler.py", "import torch",
     "pagedserve.core.scheduler -> torch"),
    # Through another module of the project, and as a relative import.
    ("backend/pagedserve/core/request.py", "from ..worker import sampler",
     "pagedserve.core.request -> pagedserve.worker.sampler -> torch"),
    ("backend/pagedserve/models/llama.py", "from pagedserve.core.scheduler import Scheduler",
     "pagedserve.models.llama -> pagedserve.core.scheduler ("),
    ("backend/pagedserve/layers/linear.py", "import pagedserve.engine.llm_engine",
     "pagedserve.layers.linear -> pagedserve.engine.llm_engine ("),
    # An import inside a function counts too.
    ("backend/pagedserve/attention/base.py",
     "def f():\n    from pagedserve.serving import contract",
     "pagedserve.attention.base -> pagedserve.serving.contract ("),
    ("backend/pagedserve/attention/selector.py", "from pagedserve.worker.sampler import Sampler",
     "pagedserve.attention.selector -> pagedserve.worker.sampler ("),
    ("backend/pagedserve/engine/llm_engine.py", "import triton_python_backend_utils as pb_utils",
     "pagedserve.engine.llm_engine -> triton_python_backend_utils ("),
    ("backend/pagedserve/engine/async_engine.py",
     "from pagedserve.serving.handler import RequestHandler",
     "pagedserve.engine.async_engine -> pagedserve.serving.handler ("),
    ("kernels/pagedserve_kernels/norm.py", "from pagedserve.layers.norm import RMSNorm",
     "pagedserve_kernels.norm -> pagedserve.layers.norm (the kernels import only"),
    ("kernels/pagedserve_kernels/ops.py", "import transformers",
     "pagedserve_kernels.ops -> transformers (the kernels import only"),
    ("backend/pagedserve/distributed/group.py", "from pagedserve.config import EngineConfig",
     "pagedserve.distributed.group -> pagedserve.config (pagedserve.distributed imports only"),
    ("backend/pagedserve/distributed/group.py", "import numpy",
     "pagedserve.distributed.group -> numpy (pagedserve.distributed imports only"),
    ("backend/pagedserve/worker/cuda_graphs.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from pagedserve.worker.model_runner import ModelRunner",
     "import cycle among pagedserve.worker.cuda_graphs, pagedserve.worker.draft_graphs, "
     "pagedserve.worker.model_runner"),
]


@pytest.mark.parametrize("relpath,line,expected", BROKEN,
                         ids=[f"{Path(b[0]).stem}:{b[1].splitlines()[-1].strip()}" for b in BROKEN])
def test_a_forbidden_import_is_reported(tmp_path, relpath, line, expected):
    for r in SOURCE_ROOTS:
        shutil.copytree(ROOT / r, tmp_path / r, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / relpath, "a") as f:
        f.write("\n" + line + "\n")
    found = violations([tmp_path / r for r in SOURCE_ROOTS])
    assert any(expected in v for v in found), found


def test_import_from_a_bare_checkout():
    """``PYTHONPATH=backend:kernels`` is all a checkout needs: no install, no import hook (-S
    skips site's .pth files; the third-party packages come from site-packages as a plain path)."""
    site_packages = sysconfig.get_paths()["purelib"]
    code = ("import pagedserve, pagedserve.serving.launcher, pagedserve_kernels.reference; "
            "print(pagedserve.__file__); print(pagedserve_kernels.reference.__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["backend", "kernels", site_packages])}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(ROOT / "backend/pagedserve/__init__.py"),
                   str(ROOT / "kernels/pagedserve_kernels/reference.py")]


def test_the_editable_install_is_a_plain_path_entry():
    dist = metadata.distribution("pagedserve")
    direct_url = dist.read_text("direct_url.json")
    if not direct_url or not json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("pagedserve is not installed in editable mode here")
    pth = [f for f in dist.files or () if str(f).endswith(".pth")]
    assert len(pth) == 1, pth
    lines = [ln for ln in pth[0].read_text().splitlines() if ln.strip()]
    assert lines == [str(ROOT / r) for r in SOURCE_ROOTS]
