#!/usr/bin/env bash
# The main job on the embedded demo dataset: set up ./.venv, build a small VGGFace2-like folder from shipped face
# photos, run the full pipeline on it and print where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh demo
exec .venv/bin/gpu-align demo "$@"
