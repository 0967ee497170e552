"""The cost of ``gpu-align run --ray`` on one CPU machine: a plain run vs a local Ray runtime with 1 and 2 workers.

Each row runs the ``gpu-align`` command as a subprocess on the same demo photos: ``plain`` is ``run PHOTOS --device
cpu``; ``ray×W`` adds ``--ray --shards S --workers W`` (a Ray runtime started by the command, W CPU workers of one
Ray CPU each, S shards, the merge, the merged report). Modes are interleaved round by round, in alternating order, so
that drifting background load (other users of a shared machine) hits them alike. Wall = the whole command (start-up
included); CPU = user + system of the command and the descendants it reaped (the plain run's packer; the driver
and Ray's own processes), plus, for ray rows, the workers' CPU from the merged report (Ray's worker processes are
not reaped by the command); "machine busy" = the share of all cores busy while the row ran (``/proc/stat``;
above this command's own share, the rest is someone else's load). The ray rows also split their wall time from
the merged report: the workers' busy time (slowest worker), the merge, and the rest (Ray start-up and shut-down,
actor start, scan, report): the fixed cost.
Every ray row's ``train.rec`` must equal the first ray row's (the bytes do not depend on the worker count).

Usage (from the repository root):
  python -m benchmarks.bench_ray [--photos 200] [--rounds 3] [--shards 4] [--write-results]
"""

from __future__ import annotations

import argparse
import hashlib
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


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _proc_stat() -> tuple[float, float]:
    """(busy, total) jiffies of all cores."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return sum(v) - idle, sum(v)


def one_run(photos: Path, out: Path, workers: int | None, shards: int) -> dict:
    """One ``gpu-align run`` (``workers`` None: plain); wall, CPU, photos/s, machine busy, the report's split."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gpu_align", "run", str(photos), "--out", str(out), "--device", "cpu", "-q"]
    if workers:
        cmd += ["--ray", "--shards", str(shards), "--workers", str(workers)]
    b0, t0j = _proc_stat()
    cpu0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0  # ray rows: + the workers' own CPU, below
    b1, t1j = _proc_stat()
    if res.returncode != 0:
        raise SystemExit(f"gpu-align failed ({'plain' if not workers else f'ray×{workers}'}):\n{res.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    inv = rep["extra"]["run"]["this_invocation"]
    m = {
        "wall": wall,
        "cpu": cpu,
        "photos": inv["processed"],
        "rate": inv["processed"] / wall,
        "busy": (b1 - b0) / max(1.0, t1j - t0j),
        "load": os.getloadavg()[0],
        "rec": hashlib.sha256((out / "train.rec").read_bytes()).hexdigest(),
    }
    if workers:
        ray = rep["extra"]["ray"]
        m["align"] = max(w["busy_s"] for w in ray["workers"])
        m["worker_cpu"] = sum(w["cpu_s"] for w in ray["workers"])
        m["merge"] = inv["merge_seconds"]
        m["fixed"] = wall - m["align"] - m["merge"]
        m["cpu"] += m["worker_cpu"]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=200, help="demo photos to build, over 40 identities (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three modes; medians (default 3)")
    ap.add_argument("--shards", type=int, default=4, help="--shards of the ray rows (default 4)")
    ap.add_argument("--write-results", action="store_true", help="update the 'Ray scale-out' section of RESULTS.md")
    args = ap.parse_args()
    from gpu_align.demo.data import build_demo_dataset

    modes: list[int | None] = [None, 1, 2]
    name = lambda w: "plain" if not w else f"ray×{w}"  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        build_demo_dataset(tmp / "photos", identities=40, images_per_identity=max(2, args.photos // 40), seed=11)
        rows: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for w in modes if r % 2 == 0 else modes[::-1]:
                m = one_run(tmp / "photos", tmp / "out", w, args.shards)
                rows.setdefault(name(w), []).append(m)
                split = f"  align {m['align']:5.1f} merge {m['merge']:4.2f} fixed {m['fixed']:5.1f}" if w else ""
                print(
                    f"round {r} {name(w):6s} wall {m['wall']:6.1f} s  cpu {m['cpu']:6.1f} s  {m['rate']:6.1f} photos/s"
                    f"  busy {m['busy']:.0%}  load {m['load']:.1f}{split}",
                    flush=True,
                )
        recs = {m["rec"] for w in (1, 2) for m in rows[name(w)]}
        same = "identical" if len(recs) == 1 else f"DIFFERENT ({len(recs)} versions)"
        text = "\n".join([*_table(rows, modes, name), "", f"`train.rec` of every ray row: {same}."])
        print(text)
        if args.write_results:
            cmd = "python -m benchmarks.bench_ray " + " ".join(a for a in sys.argv[1:] if a != "--write-results")
            n = rows["plain"][0]["photos"]
            head = f"Machine: {machine()}. {n} demo photos.\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n"
            write_section("Ray scale-out (cpu)", head + text + f"\n\nCommand: `{cmd}`.")
        if len(recs) != 1:
            raise SystemExit("the ray rows wrote different bytes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(rows: dict[str, list[dict]], modes: list[int | None], name) -> list[str]:
    med = statistics.median
    plain = med([m["wall"] for m in rows["plain"]])
    lines = [
        "| mode | photos/s | wall s (min–max) | vs plain | CPU s (workers') | workers' align s | merge s | fixed s "
        "| machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in modes:
        ms = rows[name(w)]
        walls = [m["wall"] for m in ms]
        wcpu = f" ({med([m['worker_cpu'] for m in ms]):.1f})" if w else ""
        split = (
            f"{med([m['align'] for m in ms]):.1f} | {med([m['merge'] for m in ms]):.2f} | "
            f"{med([m['fixed'] for m in ms]):.1f}"
            if w
            else "— | — | —"
        )
        lines.append(
            f"| {name(w)} | {med([m['rate'] for m in ms]):.1f} | {med(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) "
            f"| {med(walls) - plain:+.1f} s | {med([m['cpu'] for m in ms]):.1f}{wcpu} | {split} "
            f"| {', '.join(format(m['busy'], '.0%') for m in ms)} |"
        )
    return lines


if __name__ == "__main__":
    main()
