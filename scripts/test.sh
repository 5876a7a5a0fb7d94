#!/usr/bin/env bash
# The test command (README, .ci/run): lint, then every test, with the .venv that
# scripts/setup.sh creates. Extra arguments go to pytest, e.g. scripts/test.sh tests/serving
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
