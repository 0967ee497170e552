"""Throughput of the batched MTCNN vs one-image calls (and facenet-pytorch's own per-image code) on mixed sizes.

Images: the shipped photos (gpu_align.demo.photos), each resized so its long side is random in [150, 800] px.
Usage: python benchmarks/bench_mtcnn.py [--n 64] [--batch 32] [--device cpu] [--reference] [--min-face-rel 0]
       [--long-side 150 800] [--threads N]
On a shared machine, compare --threads 1 numbers (OpenMP threads spinning against other processes make
multi-thread timings erratic there; OMP_WAIT_POLICY=PASSIVE tames that).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from gpu_align.demo import photos
from gpu_align.detect.mtcnn import MTCNN


def make_images(n: int, seed: int = 0, long_side: tuple[int, int] = (150, 800)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    names = list(photos.available(photos.FACE_PHOTOS + photos.NON_FACE_PHOTOS))
    sources = {name: Image.fromarray(photos.load_rgb(name)) for name in names}
    out = []
    for i in range(n):
        src = sources[names[i % len(names)]]
        s = int(rng.integers(long_side[0], long_side[1] + 1)) / max(src.size)
        out.append(
            np.asarray(src.resize((max(1, round(src.width * s)), max(1, round(src.height * s))), Image.BILINEAR))
        )
    return out


def timed(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best wall time and best process CPU time of each function, runs interleaved (A B A B ...) so that load
    from other processes on a shared machine hits every mode alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def report(label: str, n: int, times: tuple[float, float]) -> None:
    wall, cpu = times
    print(f"{label:28s} {n / wall:8.1f} images/s wall   ({1000 * cpu / n:6.1f} ms CPU time per image)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="also time facenet-pytorch's detect_face per image")
    ap.add_argument("--long-side", type=int, nargs=2, default=(150, 800), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--min-face-rel", type=float, default=0.0, help="min face = this × short side (0: 20 px)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(args.n, long_side=tuple(args.long_side))
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    print(f"{len(images)} images, {pixels / len(images) / 1e3:.0f} kpx mean, torch threads {torch.get_num_threads()}")
    det = MTCNN(device=args.device, dtype=getattr(torch, args.dtype), channels_last=args.channels_last)
    if args.device != "cpu":
        images = [torch.from_numpy(im).to(args.device) for im in images]
    mins = None
    if args.min_face_rel > 0:
        mins = [max(20.0, args.min_face_rel * min(im.shape[:2])) for im in images]

    def batched():
        for i in range(0, len(images), args.batch):
            det.detect(images[i : i + args.batch], min_face_sizes=None if mins is None else mins[i : i + args.batch])

    def single():
        for i, im in enumerate(images):
            det.detect([im], min_face_sizes=None if mins is None else [mins[i]])

    fns = {f"batched (batch {args.batch}):": batched, "one image per call:": single}
    for label, times in timed(fns, args.repeat).items():
        report(label, len(images), times)
    if args.reference:  # timed on its own: interleaving it slowed the other modes down (allocator state)
        from gpu_align.detect.mtcnn.reference import reference_detect

        host = [im if isinstance(im, np.ndarray) else im.cpu().numpy() for im in images]
        ref = {"facenet-pytorch per image:": lambda: [reference_detect(im) for im in host]}
        for label, times in timed(ref, args.repeat).items():
            report(label, len(images), times)


if __name__ == "__main__":
    main()
