"""The hand-kept package list in pyproject.toml covers every package directory."""

from __future__ import annotations

import pathlib

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"pagedserve", "pagedserve.kernels"}
    for init in (ROOT / "backend").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "backend")
        if "__pycache__" not in rel.parts and rel.parts:
            found.add("pagedserve." + ".".join(rel.parts))
    assert found == listed
