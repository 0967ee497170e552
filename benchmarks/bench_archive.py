"""Archive input (issue 12): photos/s from a VGGFace2-like ``.tar.gz`` vs the extracted folder vs ``.tar.gz`` with
``--landmarks-csv`` (no detection), CPU, in one process; and the gzip decompression rate, the ceiling of any
``.tar.gz`` run.

    python -m benchmarks.bench_archive [--identities 24 --images 12] [--write-results]

The photos are the demo's (``build_demo_dataset``: 150-800 px, real faces); the archive is written by
``gpu_align.demo.vggface2.write_vggface2_archive`` and the CSVs from the folder run's ``train.lst``, so every
configuration aligns the same faces (the runs' records are compared: they must be the same bytes).
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_section


def _decompress_rate(archive: Path) -> tuple[float, float]:
    """(MB/s of tar output, seconds) for decompressing the whole archive with the stdlib (zlib), best of 3."""
    best = float("inf")
    total = 0
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        with gzip.open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
        best = min(best, time.perf_counter() - t0)
    return total / best / 1e6, best


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the packer processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=24, help="demo identities (default 24)")
    ap.add_argument("--images", type=int, default=12, help="photos per identity (default 12)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three sources (default 3)")
    ap.add_argument("--write-results", action="store_true", help="update the Archive input section of RESULTS.md")
    a = ap.parse_args()

    from gpu_align.csvmeta import write_vggface2_csvs
    from gpu_align.demo.data import build_demo_dataset
    from gpu_align.demo.vggface2 import write_vggface2_archive
    from gpu_align.pipeline import RunOptions, run
    from packer.archive import index_archive

    tmp = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    try:
        root = tmp / "extracted" / "train"
        built = build_demo_dataset(root, identities=a.identities, images_per_identity=a.images, seed=0)
        archive = tmp / "vggface2_train.tar.gz"
        write_vggface2_archive(root, archive, seed=0)
        photo_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        idx = index_archive(archive)
        index_s = time.perf_counter() - t0
        mbps, dec_s = _decompress_rate(archive)

        def one(name: str, src: Path, k: int, **extra) -> tuple[float, float]:
            """(photos/s wall, CPU ms per photo: this process and its packer) of one run into ``name``."""
            out = tmp / f"{name}{k}"
            opts = RunOptions(src=str(src), out=str(out), device="cpu", decoder="cpu", quiet=True, **extra)
            c0 = _cpu_seconds()
            t = time.perf_counter()
            res = run(opts)
            wall, cpu = time.perf_counter() - t, _cpu_seconds() - c0
            outs.setdefault(name, out)
            return res.processed / wall, cpu / res.processed * 1e3

        # warm-up (model load, page cache), not reported
        run(RunOptions(src=str(root), out=str(tmp / "warm"), device="cpu", decoder="cpu", quiet=True, limit=8))
        outs: dict[str, Path] = {}
        bb, lm = tmp / "meta" / "loose_bb_train.csv", tmp / "meta" / "loose_landmark_train.csv"
        runs: dict[str, list[tuple[float, float]]] = {"folder": [], "targz": [], "csv": []}
        for k in range(a.rounds):  # interleaved: a load change on this shared machine hits every source alike
            runs["folder"].append(one("folder", root, k))
            if k == 0:
                write_vggface2_csvs(outs["folder"] / "train.lst", bb, lm)
            runs["targz"].append(one("targz", archive, k))
            runs["csv"].append(one("csv", archive, k, landmarks_csv=str(lm)))
        rows = [(name, statistics.median(r for r, _ in rs), statistics.median(c for _, c in rs))
                for name, rs in runs.items()]
        same = all(
            (tmp / f"{n}{k}" / f).read_bytes() == (outs["folder"] / f).read_bytes()
            for n in ("folder", "targz", "csv")
            for k in range(a.rounds)
            for f in ("train.rec", "train.idx")
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = built.images
    avg_kb = photo_bytes / n / 1e3
    label = {"folder": "extracted folder (detect)", "targz": ".tar.gz (detect)", "csv": ".tar.gz + --landmarks-csv"}
    base_cpu = rows[0][2]
    lines = [
        f"Machine: {machine()}. {n} demo photos ({a.identities} identities, "
        f"{avg_kb:.1f} kB per photo on average, archive {archive_mb(photo_bytes)}), `--device cpu --decoder cpu`, "
        f"one process; {a.rounds} interleaved rounds, medians. CPU = this process and its packer, per photo (the "
        "number to trust on a shared machine); each run's start-up (packer spawn, model load) is in both.",
        "",
        "| source | photos/s (wall) | CPU ms / photo | CPU vs folder |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {label[k]} | {r:.1f} | {c:.1f} | {c / base_cpu:.2f}× |" for k, r, c in rows),
        "",
        f"- Records: every .tar.gz and --landmarks-csv run wrote {'the same' if same else 'DIFFERENT'} "
        "train.rec/.idx bytes as the folder run.",
        f"- gzip decompression (stdlib zlib, one core): {mbps:.0f} MB/s of tar output ({dec_s * 1e3:.0f} ms for this "
        f"archive), i.e. a ceiling of ~{mbps * 1e3 / avg_kb:,.0f} photos/s at this photo size; VGGFace2 "
        f"(~36 GB) takes ~{36e3 / mbps / 60:.1f} min per pass. Header pass (index): {index_s * 1e3:.0f} ms for "
        f"{len(idx.files)} members.",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write_results:
        write_section("Archive input", text)
    if not same:
        raise SystemExit("the .tar.gz or --landmarks-csv runs wrote other train.rec/.idx bytes than the folder run")


def archive_mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB of photos"


if __name__ == "__main__":
    main()
