"""Decode throughput on the CPU: the simplejpeg thread pool vs DALI's CPU pipeline (and DALI mixed on a GPU).

Images: --n JPEGs of 200-280 × 230-320 px (VGGFace2-like), random crops of the shipped face photos at quality
75-95, written to a temporary folder (page cache). Every row goes files -> (H, W, 3) uint8 torch tensors through
``gpu_align.decode.make_decoder`` (reading, header checks and all), except the "raw simplejpeg" row: one thread
decoding bytes already in memory, the ceiling per core.

Rounds are interleaved (every method once per round), so load from other processes hits each alike. CPU = user +
system time of this process per image (DALI's threads included): steadier than wall-clock on a shared machine.

Usage: python -m benchmarks.bench_decode [--n 2000] [--threads 2] [--repeat 7] [--write-results]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from benchmarks.common import machine, write_section
from gpu_align.decode import dali_available, make_decoder
from gpu_align.demo import photos


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    sources = [photos.load_rgb(name) for name in photos.available(("astronaut", "t1", "messi", "camera"))]
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = int(rng.integers(230, 321)), int(rng.integers(200, 281))
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        crop = np.ascontiguousarray(src[y : y + h, x : x + w])
        paths.append(folder / f"{i:06d}.jpg")
        paths[-1].write_bytes(simplejpeg.encode_jpeg(crop, quality=int(rng.integers(75, 96))))
    return paths


def network_storage(paths: list[Path], a) -> list[str]:
    """Files/s of the CPU decoder when every file read waits ``--read-latency-ms`` (network storage, simulated
    with a sleep before each read), for several file-reading thread counts (``reader_threads``)."""
    import gpu_align.decode.base as decode

    real = decode.read_image_file

    def slow_read(path, **kw):
        time.sleep(a.read_latency_ms / 1000)
        return real(path, **kw)

    out = [
        "",
        f"Network storage, simulated: {a.read_latency_ms:g} ms before every file read ({len(paths)} files, cpu "
        f"decoder, {a.threads} decode threads):",
        "",
        "| reader threads | files/s |",
        "| ---: | ---: |",
    ]
    decode.read_image_file = slow_read
    try:
        for readers in (4, 8, decode.READER_THREADS, 32):
            with make_decoder("cpu", threads=a.threads, batch_size=a.batch, reader_threads=readers) as d:
                t = time.perf_counter()
                n = sum(len(b) + len(b.failures) for b in d.batches(enumerate(paths)))
                rate = n / (time.perf_counter() - t)
            default = " (default)" if readers == decode.READER_THREADS else ""
            out.append(f"| {readers}{default} | {rate:,.0f} |")
            print(f"network storage, {readers} reader threads: {rate:,.0f} files/s")
    finally:
        decode.read_image_file = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of JPEGs (default 2000)")
    ap.add_argument("--threads", type=int, default=2, help="decoder threads (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="decode batch size (default 64)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved timed rounds (default 7)")
    ap.add_argument("--read-latency-ms", type=float, default=5.0, help="simulated network storage latency (5)")
    ap.add_argument("--write-results", action="store_true", help="update the Decode section of benchmarks/RESULTS.md")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), a.n)
        datas = [p.read_bytes() for p in paths]
        kb = np.mean([len(d) for d in datas]) / 1024

        def raw() -> int:
            for d in datas:
                simplejpeg.decode_jpeg(d, strict=False)
            return len(datas)

        rows = {"raw simplejpeg, 1 thread, bytes in memory": None}
        kinds = [("cpu", "cpu")] + ([("dali", "cpu")] if dali_available() else [])
        try:
            import torch

            if torch.cuda.is_available() and dali_available():
                kinds.append(("dali", "cuda"))
        except ImportError:
            pass
        for kind, device in kinds:
            d = make_decoder(kind, device=device, threads=a.threads, batch_size=a.batch)
            sum(len(b) for b in d.batches(enumerate(paths[:256])))  # warm-up
            rows[f"{d.name}, {a.threads} threads, files -> torch"] = d
        # the loader pool as it was (as many threads as decode threads), against the default reader threads above
        d = make_decoder("cpu", threads=a.threads, batch_size=a.batch, reader_threads=a.threads)
        rows[f"{d.name}, {a.threads} threads, {a.threads} reader threads (before: readers = decode threads)"] = d
        wall = {k: [] for k in rows}
        cpu = {k: [] for k in rows}
        for _ in range(a.repeat):
            for label, d in rows.items():
                t, c = time.perf_counter(), time.process_time()
                if d is None:
                    n = raw()
                else:
                    n = 0
                    for b in d.batches(enumerate(paths)):
                        n += len(b)
                    if d.device.type == "cuda":
                        torch.cuda.synchronize()
                wall[label].append(n / (time.perf_counter() - t))
                cpu[label].append((time.process_time() - c) / n * 1e6)
        for d in rows.values():
            if d is not None:
                d.close()
        network = network_storage(paths[: min(len(paths), 1000)], a) if a.read_latency_ms > 0 else []

    lines = [
        f"Machine: {machine()}.",
        "",
        f"{a.n} JPEGs, 200-280 × 230-320 px, {kb:.1f} KiB mean; batch {a.batch}; best and median of {a.repeat} "
        "interleaved rounds; files in the page cache. CPU = user + system time of the process per image.",
        "",
        "| decoder | img/s best | img/s median | CPU µs/img |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in rows:
        lines.append(f"| {label} | {max(wall[label]):,.0f} | {np.median(wall[label]):,.0f} | {min(cpu[label]):,.0f} |")
    lines += network
    lines += ["", f"Command: `python -m benchmarks.bench_decode --n {a.n} --threads {a.threads} --repeat {a.repeat}`."]
    text = "\n".join(lines)
    print(text)
    if a.write_results:
        write_section("Decode", text)


if __name__ == "__main__":
    main()
