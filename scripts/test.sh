#!/usr/bin/env bash
# The test suite (what CI runs): set up ./.venv with the dev, demo and dali extras (dev adds ray), lint, then pytest.
# The mxnet cross-checks build their own virtual environment under ~/.cache/gpu-align (reused between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh dev,demo,dali
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
