"""The logic behind ``scripts/gpu_check.sh``: dataset, GPU-vs-CPU comparison, decode and device-op probes, summary.

Each subcommand is one step of the script, reads and writes JSON files in the work folder, and exits non-zero when
its check fails, so the shell script only sequences, times and caps them. Run from the repository root:

  python -m benchmarks.gpu_check dataset --work W --n 20000 --distinct 4000 --subset 500
  python -m benchmarks.gpu_check plan --work W --cap 180          # --limit for the main run that fits its cap
  python -m benchmarks.gpu_check compare --work W                 # gpu500 vs cpu500, per photo
  python -m benchmarks.gpu_check decode-rate --work W --device cuda
  python -m benchmarks.gpu_check device-ops --work W --device cuda --batch 256
  python -m benchmarks.gpu_check summary --work W --out DIR --mode gpu --command "..." [--results PATH]
  python -m benchmarks.gpu_check apply-results DIR/RESULTS-gpu-section.md   # on the dev machine, after a device run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

# GPU vs CPU on the same photos. Why these numbers: decoders differ by ±1 grey level on some pixels (DALI's
# hardware/CUDA/CPU decoders by batch position; chroma upsampling), the networks run in IEEE fp32 on both sides
# (gpu_align.device.full_fp32 turns TF32 off), so detections differ only through those input pixels: sub-pixel
# landmark moves on 50-500 px faces, i.e. well under 0.5 px on average, and crops within ~1 level plus JPEG q95
# re-encoding noise. A face whose MTCNN score sits at the 0.9 floor can flip found/missed on a ±1 pixel change,
# and a multi-face photo can pick the other face: allowed once per 500 photos each, and every one is listed.
MAX_FLIP_FRACTION = 0.002  # photos found on one side only
MAX_MEAN_POINT_ERROR_PX = 0.5  # mean over photos of the mean distance between the 5 landmark pairs
OUTLIER_PX = 2.0  # a photo whose mean point error exceeds this chose another face (or drifted): listed
MAX_OUTLIER_FRACTION = 0.002
MAX_CROP_MAD = 2.0  # mean absolute difference of the stored 112x112 crops, grey levels (0-255), non-outliers


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links: a copy is as good for reading
        shutil.copyfile(src, dst)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- dataset
def cmd_dataset(a) -> int:
    """``distinct`` demo photos, hard-linked into ``n`` files under identity folders (copies as new identities);
    ``subset``: evenly spaced photos of the first copy, hard-linked with the same relative paths."""
    from gpu_align.demo.data import build_demo_dataset

    work = Path(a.work)
    distinct, photos, subset = work / "distinct", work / "photos", work / "subset"
    for d in (distinct, photos, subset):
        shutil.rmtree(d, ignore_errors=True)
    n_distinct = min(a.distinct, a.n)
    t0 = time.perf_counter()
    summary = build_demo_dataset(
        distinct,
        identities=max(1, math.ceil(n_distinct / 12)),
        images_per_identity=12,
        seed=1,
        threads=a.threads or os.cpu_count(),
    )
    built = time.perf_counter() - t0
    sources = _files(distinct)
    # Copy k of identity X is the identity X_rk: a new class with the same photos, as a bigger dataset would have.
    made = 0
    for k in range(math.ceil(a.n / len(sources))):
        for src in sources:
            if made == a.n:
                break
            ident = src.parent.name + (f"_r{k}" if k else "")
            (photos / ident).mkdir(parents=True, exist_ok=True)
            _link(src, photos / ident / src.name)
            made += 1
    first = [p for p in _files(photos) if "_r" not in p.parent.name]
    step = max(1, len(first) // max(1, a.subset))
    picked = first[::step][: a.subset]
    for p in picked:
        (subset / p.parent.name).mkdir(parents=True, exist_ok=True)
        _link(p, subset / p.parent.name / p.name)
    info = {
        "photos": made,
        "distinct": len(sources),
        "subset": len(picked),
        "identities": len({p.parent.name for p in _files(photos)}),
        "build_seconds": round(built, 2),
        "distinct_per_second": round(len(sources) / built, 1) if built else None,
        "megabytes": round(sum(p.stat().st_size for p in sources) * made / len(sources) / 1e6, 1),
        "grayscale": summary.grayscale,
        "png": summary.png,
        "exif_rotated": summary.exif_rotated,
    }
    _write_json(work / "dataset.json", info)
    print(
        f"dataset: {made:,} photos in {info['identities']} identity folders ({len(sources):,} distinct, built in "
        f"{built:.1f} s = {info['distinct_per_second']}/s; the rest hard links), subset {len(picked)} photos"
    )
    return 0


# ---------------------------------------------------------------------------------------------------- plan
def _report(out: Path) -> dict | None:
    return _read_json(out / "report.json")


def _invocation(rep: dict) -> dict:
    return rep["extra"]["run"]["this_invocation"]


_PROCESS_STAGES = ("decode", "detect", "refine", "warp", "transfer")


def cmd_plan(a) -> int:
    """Print the ``--limit`` for the main GPU run so it ends within ``cap`` seconds, from the subset run's rate
    (stage seconds for the per-photo cost, the rest of its wall time as start-up); 0 = no limit needed."""
    work = Path(a.work)
    n = _read_json(work / "dataset.json")["photos"]
    rep = _report(work / "gpu500")
    limit = 0
    if rep:
        inv = _invocation(rep)
        busy = sum(inv["stage_seconds"].get(s, 0.0) for s in _PROCESS_STAGES)
        startup = max(0.0, inv["seconds"] - busy)
        per_photo = busy / max(1, inv["processed"])
        projected = startup + n * per_photo
        if projected > a.fill * a.cap and per_photo > 0:
            limit = max(1000, int((a.fill * a.cap - startup) / per_photo))
            limit = min(limit, n)
        print(
            f"plan: subset run {inv['processed']} photos, start-up {startup:.1f} s, {per_photo * 1e3:.2f} ms/photo: "
            f"{n:,} photos projected {projected:.0f} s for a {a.cap} s cap -> "
            + (f"--limit {limit}" if limit else "all photos"),
            file=sys.stderr,
        )
    else:
        print("plan: no subset run to plan from: all photos", file=sys.stderr)
    _write_json(work / "plan.json", {"limit": limit, "photos": n})
    print(limit)
    return 0


# ---------------------------------------------------------------------------------------------------- compare
def read_lst(out: Path) -> dict[str, np.ndarray]:
    """relative photo path -> the 5 landmarks as (5, 2) (x, y), from ``out/train.lst`` (paths relative to the
    run's source folder, read from report.json)."""
    source = Path(_report(out)["config"]["input"]["source"])
    faces = {}
    for line in (out / "train.lst").read_text(encoding="utf-8").splitlines():
        f = line.split("\t")
        nums = [float(v) for v in f[3:]]
        if len(nums) < 14:
            raise ValueError(f"{out}/train.lst: expected box + 10 landmark values, got {line!r}")
        rel = Path(f[1]).relative_to(source).as_posix()
        faces[rel] = np.array(nums[4:14]).reshape(2, 5).T  # all x first, then all y
    return faces


def _crop(crops: Path, rel: str) -> np.ndarray | None:
    import cv2

    p = Path(rel)
    for name in (p.stem + ".jpg", p.name + ".jpg"):  # --save-crops: <stem>.jpg, or <name>.jpg on a clash
        img = cv2.imread(str(crops / p.parent / name), cv2.IMREAD_COLOR)
        if img is not None:
            return img.astype(np.float32)
    return None


def compare_runs(gpu: Path, cpu: Path, gpu_crops: Path, cpu_crops: Path) -> dict:
    """Per photo: found on both sides, landmark distance, crop difference; and whether the tolerances hold."""
    g, c = read_lst(gpu), read_lst(cpu)
    inputs = _invocation(_report(cpu))["processed"]
    only_gpu, only_cpu = sorted(set(g) - set(c)), sorted(set(c) - set(g))
    both = sorted(set(g) & set(c))
    err = {rel: float(np.linalg.norm(g[rel] - c[rel], axis=1).mean()) for rel in both}
    outliers = sorted((rel for rel in both if err[rel] > OUTLIER_PX), key=lambda r: -err[r])
    mads, missing_crops = [], 0
    for rel in both:
        if rel in outliers:
            continue
        a, b = _crop(gpu_crops, rel), _crop(cpu_crops, rel)
        if a is None or b is None or a.shape != b.shape:
            missing_crops += 1
            continue
        mads.append(float(np.abs(a - b).mean()))
    errs = [err[r] for r in both if r not in outliers]
    res = {
        "photos": inputs,
        "found_gpu": len(g),
        "found_cpu": len(c),
        "found_both": len(both),
        "flips": len(only_gpu) + len(only_cpu),
        "only_gpu": only_gpu[:20],
        "only_cpu": only_cpu[:20],
        "outliers": [(r, round(err[r], 2)) for r in outliers[:20]],
        "n_outliers": len(outliers),
        "mean_point_error_px": round(float(np.mean(errs)), 4) if errs else None,
        "max_point_error_px": round(float(np.max(errs)), 4) if errs else None,
        "crop_mad_mean": round(float(np.mean(mads)), 3) if mads else None,
        "crop_mad_max": round(float(np.max(mads)), 3) if mads else None,
        "crops_compared": len(mads),
        "crops_missing": missing_crops,
        "tolerances": {
            "max_flips": math.floor(MAX_FLIP_FRACTION * inputs),
            "max_mean_point_error_px": MAX_MEAN_POINT_ERROR_PX,
            "outlier_px": OUTLIER_PX,
            "max_outliers": math.floor(MAX_OUTLIER_FRACTION * inputs),
            "max_crop_mad": MAX_CROP_MAD,
        },
    }
    t = res["tolerances"]
    problems = []
    if res["flips"] > t["max_flips"]:
        problems.append(f"{res['flips']} photos found on one side only (at most {t['max_flips']})")
    if res["n_outliers"] > t["max_outliers"]:
        problems.append(
            f"{res['n_outliers']} photos with landmarks > {OUTLIER_PX} px apart (at most {t['max_outliers']})"
        )
    if errs and res["mean_point_error_px"] > MAX_MEAN_POINT_ERROR_PX:
        problems.append(f"mean landmark error {res['mean_point_error_px']} px > {MAX_MEAN_POINT_ERROR_PX}")
    if mads and res["crop_mad_mean"] > MAX_CROP_MAD:
        problems.append(f"crops differ by {res['crop_mad_mean']} grey levels on average > {MAX_CROP_MAD}")
    if not both:
        problems.append("no photo found on both sides")
    elif not mads:
        problems.append("no crops to compare (--save-crops missing?)")
    res["problems"] = problems
    res["ok"] = not problems
    return res


def cmd_compare(a) -> int:
    work = Path(a.work)
    res = compare_runs(work / "gpu500", work / "cpu500", work / "gpu500-crops", work / "cpu500-crops")
    _write_json(work / "compare.json", res)
    print(
        f"compare ({res['photos']} photos): found gpu {res['found_gpu']} / cpu {res['found_cpu']}, flips "
        f"{res['flips']}, landmark error mean {res['mean_point_error_px']} px (max {res['max_point_error_px']}), "
        f"outliers {res['n_outliers']}, crop MAD mean {res['crop_mad_mean']} (max {res['crop_mad_max']}) over "
        f"{res['crops_compared']} crops: " + ("OK" if res["ok"] else "FAILED: " + "; ".join(res["problems"]))
    )
    for rel in res["only_gpu"] + res["only_cpu"]:
        print(f"  flip: {rel} ({'gpu' if rel in res['only_gpu'] else 'cpu'} only)")
    for rel, e in res["outliers"]:
        print(f"  outlier: {rel} {e} px")
    return 0 if res["ok"] else 1


# ---------------------------------------------------------------------------------------------------- probes
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_decode_rate(a) -> int:
    """Decode alone: files -> (H, W, 3) uint8 tensors on the device, through gpu_align.decode.make_decoder (reads
    and header checks included), for each decoder kind; 1 warm-up pass, then the best of ``repeat`` passes."""
    import torch

    from gpu_align.decode import dali_available, make_decoder

    work = Path(a.work)
    device = torch.device(a.device)
    paths = _files(work / "distinct")[: a.n]
    rows = {}
    for kind in a.kinds.split(","):
        if kind == "dali" and not dali_available():
            rows[kind] = {"skipped": "DALI not installed"}
            continue
        with make_decoder(kind, device=device, batch_size=a.batch) as dec:
            best = math.inf
            for r in range(a.repeat + 1):
                t0 = time.perf_counter()
                n = sum(len(b) for b in dec.batches(enumerate(paths)))
                _sync(device)
                if r:
                    best = min(best, time.perf_counter() - t0)
            rows[kind] = {"images": n, "seconds": round(best, 4), "per_second": round(n / best, 1), "name": repr(dec)}
        print(f"decode {kind} -> {device}: {n} files, {n / best:,.0f} img/s ({dec!r})")
    _write_json(work / "decode.json", {"device": str(device), "batch": a.batch, "rows": rows})
    return 0


def _decoded(paths: list[Path], device) -> list:
    from gpu_align.decode import make_decoder

    with make_decoder("cpu", device=device, batch_size=len(paths)) as dec:
        return [im for b in dec.batches(enumerate(paths)) for im in b.images]


def cmd_device_ops(a) -> int:
    """One ``FaceAligner.align`` of ``batch`` dataset photos on ``device`` under torch.profiler: CUDA kernels per
    photo (profiler's CUDA events), aten ops that would launch (bench_launches' count) and host syncs per batch
    (bench_launches' SyncCounter: device reads by the host and data-dependent sizes)."""
    import torch

    from gpu_align import FaceAligner

    work = Path(a.work)
    device = torch.device(a.device)
    images = _decoded(_files(work / "distinct")[: a.batch], device)
    aligner = FaceAligner(device=device)
    aligner.align(images[:16])  # weights, lazy inits, cuDNN autotuning
    aligner.align(images)
    _sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    res: dict = {"device": str(device), "batch": len(images)}
    try:  # the CPU-side counting rules live in bench_launches; the CUDA kernel count does not need them
        from benchmarks.bench_launches import SyncCounter, count_device_ops

        counter = SyncCounter(False)
    except Exception as e:
        count_device_ops, counter, res["note"] = None, None, f"bench_launches helpers unavailable: {e}"
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        if counter is not None:
            with counter:
                out = aligner.align(images)
        else:
            out = aligner.align(images)
        _sync(device)
    res["seconds_profiled"] = round(time.perf_counter() - t0, 3)
    if device.type == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == cuda) or sum(
            e.count for e in prof.key_averages() if getattr(e, "device_type", None) == cuda
        )
        # 0 would mean the profiler recorded no device activity (CUPTI unavailable), not a free align()
        res["cuda_kernels_per_photo"] = round(kernels / len(images), 1) if kernels else None
    if count_device_ops is not None:
        res["aten_ops_per_photo"] = round(sum(count_device_ops(prof).values()) / len(images), 1)
        res["host_syncs_per_batch"] = sum(counter.syncs.values())
    res["found"] = int(out.found.sum())
    # unprofiled timing of the same call: the aligner alone, photos already on the device
    _sync(device)
    t0 = time.perf_counter()
    aligner.align(images)
    _sync(device)
    dt = time.perf_counter() - t0
    res["align_photos_per_second"] = round(len(images) / dt, 1)
    if device.type == "cuda":
        res["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    _write_json(work / "ops.json", res)
    print("device ops:", json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------------- summary
def gpu_samples(path: Path) -> dict | None:
    """nvidia-smi CSV (memory.used MiB, utilization.gpu %) -> peak memory above the first sample, util stats."""
    mem, util = [], []
    try:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                try:
                    m, u = float(row[-2]), float(row[-1])
                except (ValueError, IndexError):
                    continue  # header, or a line cut when the sampler was stopped
                mem.append(m)
                util.append(u)
    except OSError:
        return None
    if not mem:
        return None
    return {
        "samples": len(mem),
        "memory_peak_mib": max(mem),
        "memory_peak_over_idle_mib": max(mem) - mem[0],
        "util_min": min(util),
        "util_median": statistics.median(util),
        "util_max": max(util),
    }


def gpu_name() -> str | None:
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, _, driver = out[0].partition(",")
    return f"{name.strip()}, driver {driver.strip()}"


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, status, seconds, cap, note = (line.split("\t") + [""] * 5)[:5]
            steps.append({"step": name, "status": status, "seconds": float(seconds or 0), "cap": cap, "note": note})
    return steps


def _rate(n: float, s: float) -> str:
    return f"{n / s:,.0f}" if s and s > 0 else "n/a"


def build_summary(work: Path, mode: str, command: str) -> tuple[dict, list[str], list[str]]:
    """(summary dict, printed lines, RESULTS.md section lines)."""
    steps = read_steps(work / "steps.tsv")
    step = {s["step"]: s for s in steps}
    ds = _read_json(work / "dataset.json") or {}
    main, sub_gpu, sub_cpu = _report(work / "gpu"), _report(work / "gpu500"), _report(work / "cpu500")
    cmp_ = _read_json(work / "compare.json")
    dec = _read_json(work / "decode.json")
    ops = _read_json(work / "ops.json")
    ver = _read_json(work / "verify.json")
    plan = _read_json(work / "plan.json") or {}
    smp = gpu_samples(work / "gpu_samples.csv")
    gpu = gpu_name() if mode == "gpu" else None
    s: dict = {"mode": mode, "gpu": gpu, "date": datetime.date.today().isoformat(), "command": command}
    lines = [f"GPU check summary ({'GPU' if mode == 'gpu' else 'CPU dry run: --device cpu --decoder cpu'})"]
    lines.append(f"  gpu:            {gpu or 'none'}")
    lines.append(
        f"  dataset:        {ds.get('photos', 0):,} photos ({ds.get('distinct', 0):,} distinct), subset "
        f"{ds.get('subset', 0)}"
    )
    rows = []
    if main:
        inv = _invocation(main)
        n, secs = inv["processed"], inv["seconds"]
        wall = step.get("gpu-main", {}).get("seconds") or secs
        st = inv["stage_seconds"]
        pk = main["extra"].get("packer", {})
        s["main"] = {
            "photos": n,
            "found": inv["found"],
            "seconds": secs,
            "wall_seconds": wall,
            "per_second": n / secs,
            "wall_per_second": n / wall,
            "stage_seconds": st,
            "packer": pk,
            "decoder": main["extra"]["run"]["decoder"],
            "limit": plan.get("limit", 0),
        }
        stages = ", ".join(f"{k} {_rate(n, st[k])}/s ({st[k]:.1f} s)" for k in _PROCESS_STAGES if st.get(k, 0) >= 0.01)
        packer = ", ".join(
            f"{k[:-2]} {_rate(n, pk[k])}/s ({pk[k]:.1f} s)" for k in ("encode_s", "write_s") if pk.get(k)
        )
        lines.append(
            f"  end to end:     {n / secs:,.0f} photos/s ({n:,} photos, {inv['found']:,} faces, {secs:.1f} s in the "
            "run; "
            f"{n / wall:,.0f}/s over {wall:.1f} s with process start-up)"
            + (f"; limited to {plan['limit']:,} photos to fit the cap" if plan.get("limit") else "")
        )
        lines.append(f"  per stage:      {stages}")
        busy = sum(st.get(k, 0.0) for k in _PROCESS_STAGES)
        lines.append(
            f"  overlap:        the stages add up to {busy:.1f} s in {secs:.1f} s of run ({busy / secs:.2f}x; above "
            "1 they overlap: decode and the next batch run while a batch's warp and host copy finish; 'transfer' is "
            "the host's wait for a copy)"
        )
        lines.append(f"  packer:         {packer or 'n/a'} (separate process, overlapped)")
        lines.append(f"  decoder:        {s['main']['decoder']}")
        rows += [
            ("End to end (in the run)", f"{n / secs:,.0f} photos/s", f"{n:,} photos, {secs:.1f} s"),
            ("End to end (with start-up)", f"{n / wall:,.0f} photos/s", f"{wall:.1f} s wall clock"),
            *[
                (f"Stage: {k}", f"{_rate(n, st[k])} photos/s", f"{st[k]:.2f} s")
                for k in _PROCESS_STAGES
                if st.get(k, 0) >= 0.01
            ],
            *[
                (f"Packer: {k[:-2]}", f"{_rate(n, pk[k])} photos/s", f"{pk[k]:.2f} s")
                for k in ("encode_s", "write_s")
                if pk.get(k)
            ],
        ]
    else:
        lines.append(f"  end to end:     n/a (gpu-main: {step.get('gpu-main', {}).get('status', 'not run')})")
    if smp:
        s["gpu_samples"] = smp
        lines.append(
            f"  GPU memory:     peak {smp['memory_peak_mib']:,.0f} MiB ({smp['memory_peak_over_idle_mib']:,.0f} above "
            f"idle), nvidia-smi, {smp['samples']} samples"
        )
        lines.append(
            f"  GPU util:       min {smp['util_min']:.0f} % / median {smp['util_median']:.0f} % / max "
            f"{smp['util_max']:.0f} %"
        )
        rows += [
            (
                "GPU memory peak (nvidia-smi)",
                f"{smp['memory_peak_mib']:,.0f} MiB",
                f"{smp['memory_peak_over_idle_mib']:,.0f} above idle",
            ),
            (
                "GPU utilisation min/median/max",
                f"{smp['util_min']:.0f}/{smp['util_median']:.0f}/{smp['util_max']:.0f} %",
                f"{smp['samples']} samples",
            ),
        ]
    else:
        lines.append(
            "  GPU memory:     skipped: no GPU samples" if mode == "gpu" else "  GPU memory:     skipped: no GPU"
        )
    if dec:
        s["decode"] = dec
        for kind, r in dec["rows"].items():
            if "skipped" in r:
                lines.append(f"  decode {kind}:     skipped: {r['skipped']}")
                continue
            lines.append(
                f"  decode {kind}:     {r['per_second']:,.0f} img/s alone -> {dec['device']} ({r['images']} files)"
            )
            rows.append((f"Decode alone: {kind} -> {dec['device']}", f"{r['per_second']:,.0f} img/s", r["name"]))
    else:
        lines.append(f"  decode alone:   n/a ({step.get('decode-rate', {}).get('status', 'not run')})")
    if ops:
        s["ops"] = ops
        parts = [
            f"{k} {ops[k]}"
            for k in (
                "cuda_kernels_per_photo",
                "aten_ops_per_photo",
                "host_syncs_per_batch",
                "align_photos_per_second",
                "max_memory_allocated_mb",
            )
            if k in ops
        ]
        lines.append(f"  device ops:     batch {ops['batch']} on {ops['device']}: " + ", ".join(parts))
        rows.append((f"Device ops, align() of {ops['batch']} on {ops['device']}", ", ".join(parts), ""))
    else:
        lines.append(f"  device ops:     n/a ({step.get('device-ops', {}).get('status', 'not run')})")
    if sub_cpu:
        ic = _invocation(sub_cpu)
        cpu_rate = ic["processed"] / ic["seconds"]
        s["cpu_subset_per_second"] = cpu_rate
        # both in-run rates (model loading included, process start-up not): the CPU's start-up weighs more on
        # its 500 photos than the GPU's on 20,000, so the ratio errs low
        ratio = f"{s['main']['per_second'] / cpu_rate:.1f}x" if main else "n/a"
        sub = ""
        if sub_gpu:
            ig = _invocation(sub_gpu)
            sub = f"; same {ig['processed']} photos: {ig['processed'] / ig['seconds']:,.0f}/s vs {cpu_rate:,.0f}/s"
        lines.append(f"  vs CPU path:    {ratio} (CPU {cpu_rate:,.0f} photos/s on {ic['processed']} photos{sub})")
        rows.append(("CPU path (--device cpu --decoder cpu)", f"{cpu_rate:,.0f} photos/s", f"ratio {ratio}"))
    if cmp_:
        s["compare"] = cmp_
        lines.append(
            f"  GPU vs CPU:     {'OK' if cmp_['ok'] else 'FAILED'}: flips {cmp_['flips']}, landmark error mean "
            f"{cmp_['mean_point_error_px']} px, outliers {cmp_['n_outliers']}, crop MAD mean {cmp_['crop_mad_mean']}"
            + ("" if cmp_["ok"] else " (" + "; ".join(cmp_["problems"]) + ")")
        )
        t = cmp_["tolerances"]
        rows.append(
            (
                f"GPU vs CPU on {cmp_['photos']} photos",
                "OK" if cmp_["ok"] else "FAILED",
                f"flips {cmp_['flips']} (≤ {t['max_flips']}), landmarks {cmp_['mean_point_error_px']} px mean "
                f"(≤ {t['max_mean_point_error_px']}), crops {cmp_['crop_mad_mean']} grey levels "
                f"(≤ {t['max_crop_mad']})",
            )
        )
    if ver is not None:
        ok = ver.get("ok", not ver.get("problems"))
        lines.append(f"  verify:         {'OK' if ok else 'PROBLEMS'}")
    timing = ", ".join(
        f"{x['step']} {x['seconds']:.0f}s{'' if x['status'] == 'ok' else ' ' + x['status']}" for x in steps
    )
    lines.append(f"  steps:          {timing}")
    failed = [x["step"] for x in steps if x["status"] not in ("ok", "skipped")]
    lines.append(f"  result:         {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed or skipped'}")
    s["steps"], s["failed"] = steps, failed
    machine = common.machine(load=False)
    section = [
        f"Machine: {gpu + '; ' if gpu else ''}{machine}.",
        "",
        f"Dataset: {ds.get('photos', 0):,} demo photos (`gpu_align.demo.data`, seed 1; {ds.get('distinct', 0):,} "
        "distinct, the rest hard links as further identities). "
        + (
            ""
            if mode == "gpu"
            else "**CPU dry run** (`--device cpu --decoder cpu`): proves the plumbing, not a GPU figure."
        ),
        "",
        "| what | value | detail |",
        "| --- | ---: | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Steps (seconds): {timing}." + (f" Failed: {', '.join(failed)}." if failed else ""),
        "",
        f"Command: `{command}` ({s['date']}).",
    ]
    return s, lines, section


def section_title(mode: str) -> str:
    return "GPU check" if mode == "gpu" else "GPU check (CPU dry run)"


def cmd_summary(a) -> int:
    work, out = Path(a.work), Path(a.out)
    s, lines, section = build_summary(work, a.mode, a.command)
    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    _write_json(out / "summary.json", s)
    title = section_title(a.mode)
    (out / "RESULTS-gpu-section.md").write_text(f"## {title}\n\n" + "\n".join(section) + "\n", encoding="utf-8")
    results = Path(a.results)
    if results.resolve() != common.RESULTS.resolve() and not results.exists() and common.RESULTS.exists():
        shutil.copyfile(common.RESULTS, results)  # a copy of the real file, with this section written into it
    common.RESULTS = results  # write_section reads the module global
    common.write_section(title, "\n".join(section))
    print(f"  results:        '## {title}' written to {results}")
    return 0


def cmd_apply_results(a) -> int:
    """Write a section file brought back from a device (``## title`` + body) into benchmarks/RESULTS.md."""
    text = Path(a.section).read_text(encoding="utf-8")
    head, _, body = text.partition("\n")
    if not head.startswith("## "):
        print(f"{a.section}: does not start with a '## ' heading", file=sys.stderr)
        return 1
    if a.results:
        common.RESULTS = Path(a.results)
    common.write_section(head[3:].strip(), body.strip())
    print(f"'{head}' written to {common.RESULTS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dataset")
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--distinct", type=int, default=4000, help="distinct photos rendered; the rest are hard links")
    p.add_argument("--subset", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="render threads (default: all cores)")
    p.set_defaults(fn=cmd_dataset)
    p = sub.add_parser("plan")
    p.add_argument("--work", required=True)
    p.add_argument("--cap", type=float, required=True, help="the main run's time cap, seconds")
    p.add_argument("--fill", type=float, default=0.7, help="fraction of the cap to plan for (default 0.7)")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("compare")
    p.add_argument("--work", required=True)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("decode-rate")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--kinds", default="dali,cpu")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.set_defaults(fn=cmd_decode_rate)
    p = sub.add_parser("device-ops")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(fn=cmd_device_ops)
    p = sub.add_parser("summary")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("gpu", "dry"), required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--results", required=True, help="the RESULTS.md to write the section into")
    p.set_defaults(fn=cmd_summary)
    p = sub.add_parser("apply-results")
    p.add_argument("section")
    p.add_argument("--results", default=None)
    p.set_defaults(fn=cmd_apply_results)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
