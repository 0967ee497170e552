"""``gpu-align run`` on the CPU, on a quiet machine and beside k busy-loop processes: does it keep its fair share?

With k other CPU-bound processes on an n-core machine, a fair scheduler gives this run about n/(n+k) of the
machine, so its throughput should stay at ≥ 1/(k+1) of the quiet one (on a 2-core machine, k=1: the run loses at
most one of its two cores). OpenMP threads that spin while waiting for work (``OMP_WAIT_POLICY=ACTIVE``, libgomp's
default spin before sleeping) burn the time slices the run needs and fall far below that.

Each row runs ``python -m gpu_align run PHOTOS --device cpu -q`` as a subprocess with the setting in its
environment (``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS`` = torch's intra-op threads; ``default`` = whatever gpu-align
itself picks), with k ``while True: pass`` processes started a second before it and killed after it. Settings and
loads are interleaved round by round so that drifting background load (other users of a shared machine) hits them
alike; each row reports the load average seen while it ran. Wall = the whole command (start-up included), CPU = user
+ system of the command and its packer process. Fair share = photos/s under load / photos/s quiet, same setting,
medians of the rounds.

``--startup`` also times the start-up to the first batch (one photo, ``--limit 1``) and its parts in-process.

Usage (from the repository root):
  python -m benchmarks.bench_load [--photos 200] [--rounds 2] [--loads 0,1,2] [--settings default,active2,...]
                                  [--startup] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, write_section

# name -> environment overrides; None removes the variable (gpu-align's own default applies)
SETTINGS: dict[str, dict[str, str | None]] = {
    "default": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None},
    # gpu-align before it set OMP_WAIT_POLICY: libgomp's own default (an empty value is ignored by libgomp and
    # kept by gpu-align's setdefault)
    "libgomp": {"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": None},
    "active2": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"},
    "passive2": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"},
    "active1": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"},
    "passive1": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}


def _env(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in SETTINGS[setting].items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _busy(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def one_run(photos: Path, out: Path, setting: str, k: int, extra: list[str] | None = None) -> dict:
    """Run gpu-align once beside k busy loops; wall, CPU (this command only), photos/s, load average."""
    shutil.rmtree(out, ignore_errors=True)
    load = _busy(k)
    try:
        time.sleep(1.0 if k else 0.0)  # let the busy loops take their cores first
        cpu0, t0 = _children_cpu(), time.perf_counter()
        cmd = [sys.executable, "-m", "gpu_align", "run", str(photos), "--out", str(out), "--device", "cpu", "-q"]
        res = subprocess.run(cmd + (extra or []), env=_env(setting), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0  # before the busy loops are reaped: RUSAGE_CHILDREN counts reaped children only
    finally:
        _stop(load)
    if res.returncode != 0:
        raise SystemExit(f"gpu-align failed ({setting}, k={k}):\n{res.stderr[-2000:]}")
    rep = json.loads((out / "report.json").read_text())
    n = rep["extra"]["run"]["this_invocation"]["processed"]
    return {"wall": wall, "cpu": cpu, "photos": n, "rate": n / wall, "load": os.getloadavg()[0]}


# In a fresh interpreter: import, scan, packer spawn until ready, model load (seconds).
STARTUP_PARTS = r"""
import json, sys, time, tempfile
t0 = time.perf_counter()
import torch
from gpu_align.pipeline import RunOptions, StageTimes, resolve_device
from gpu_align.pipeline.align_stage import AlignStage
from gpu_align.pipeline.stages import _start_packer
from gpu_align.scan import scan_source
t1 = time.perf_counter()
opts = RunOptions(src=sys.argv[1], out=tempfile.mkdtemp() + "/o", device="cpu", batch_size=32)
src = scan_source(opts.src, limit=1)
t2 = time.perf_counter()
packer = _start_packer(opts, src, src.fingerprint())
packer.ready()
t3 = time.perf_counter()
al = AlignStage(opts, torch.device("cpu"), src.items, StageTimes())
t4 = time.perf_counter()
packer.abort()
print(json.dumps({"import": t1 - t0, "scan": t2 - t1, "packer ready": t3 - t2, "model load": t4 - t3}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", default="0,1,2", help="numbers of busy-loop processes")
    ap.add_argument("--settings", default="active2,passive2,active1,passive1,default")
    ap.add_argument("--startup", action="store_true", help="also time the start-up to the first batch")
    ap.add_argument("--write-results", action="store_true", help="update the 'Busy machine' section of RESULTS.md")
    args = ap.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    settings = args.settings.split(",")
    from gpu_align.demo.data import build_demo_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        per = max(2, args.photos // 20)
        build_demo_dataset(tmp / "photos", identities=20, images_per_identity=per)
        rows: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for k in loads:
                order = settings if r % 2 == 0 else settings[::-1]  # interleaved, alternating order
                for s in order:
                    m = one_run(tmp / "photos", tmp / "out", s, k)
                    rows.setdefault((s, k), []).append(m)
                    print(
                        f"round {r} k={k} {s:9s} wall {m['wall']:6.1f} s  cpu {m['cpu']:6.1f} s  "
                        f"{m['rate']:6.1f} photos/s  load {m['load']:.1f}",
                        flush=True,
                    )
        lines = _table(rows, settings, loads)
        startup: list[str] = []
        if args.startup:
            startup = _startup(tmp / "photos", args.rounds)
        text = "\n".join(lines + startup)
        print(text)
        if args.write_results:
            cmd = "python -m benchmarks.bench_load " + " ".join(a for a in sys.argv[1:] if a != "--write-results")
            head = f"Machine: {machine()}.\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n"
            write_section("Busy machine (cpu)", head + text + f"\n\nCommand: `{cmd}`.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(rows: dict, settings: list[str], loads: list[int]) -> list[str]:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    lines = [
        "| setting | k busy | photos/s (wall) | wall s | CPU s | fair share (≥ 1/(k+1)) | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in settings:
        quiet = med([m["rate"] for m in rows.get((s, 0), [])]) if (s, 0) in rows else None
        for k in loads:
            ms = rows[(s, k)]
            rate = med([m["rate"] for m in ms])
            share = f"{rate / quiet:.2f} (≥ {1 / (k + 1):.2f})" if quiet and k else "—"
            seen = ", ".join(f"{m['load']:.1f}" for m in ms)
            lines.append(
                f"| {s} | {k} | {rate:.1f} | {med([m['wall'] for m in ms]):.1f} | {med([m['cpu'] for m in ms]):.1f} "
                f"| {share} | {seen} |"
            )
    return lines


def _startup(photos: Path, rounds: int) -> list[str]:
    out = [
        "",
        "Start-up (one photo, `--limit 1`, quiet machine), medians:",
        "",
        "| part | seconds |",
        "| --- | ---: |",
    ]
    walls, parts = [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(max(3, rounds)):
            walls.append(one_run(photos, Path(d) / "o", "default", 0, ["--limit", "1"])["wall"])
            res = subprocess.run(
                [sys.executable, "-c", STARTUP_PARTS, str(photos)], cwd=ROOT, capture_output=True, text=True
            )
            if res.returncode == 0:
                parts.append(json.loads(res.stdout.strip().splitlines()[-1]))
    out.append(f"| whole command, 1 photo | {statistics.median(walls):.2f} |")
    for key in parts[0] if parts else []:
        out.append(f"| {key} | {statistics.median([p[key] for p in parts]):.2f} |")
    return out


if __name__ == "__main__":
    main()
