#!/usr/bin/env bash
# The main job on the embedded demo dataset: set up ./.venv, build a small VGGFace2-like folder from shipped face
# photos, run the full pipeline on it and print where the outputs are, and the next commands to try.
# Writes ./demo-output in the current folder (arguments go to `gpu-align demo`, e.g. --out DIR). The commands it
# prints name the gpu-align it ran (.venv/bin/gpu-align), so they work as printed without activating the venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup_env.sh" demo
if [ "$PWD" = "$root" ]; then
  exec .venv/bin/gpu-align demo "$@"
fi
exec "$root/.venv/bin/gpu-align" demo "$@"
