"""End-to-end ``gpu-align run`` throughput vs the per-image MTCNN approach, measured in one run.

Photos: a VGGFace2-like folder built by ``gpu_align.demo.data`` from the shipped face photos (150–800 px, varied
crops, EXIF rotations, JPEG qualities, some grayscale and PNG).

Rows:
  gpu-align run          the whole pipeline (scan, decode, batched MTCNN, batched warp, packer process: JPEG encode
                         and RecordIO write), wall clock from start to finished dataset, model loading included
  per-image baseline     what align scripts do today, one photo at a time: cv2.imread, facenet-pytorch 2.6.0's own
                         MTCNN code at full resolution (gpu_align.detect.mtcnn.reference), the largest-centre face,
                         skimage similarity + cv2.warpAffine, cv2.imencode q95, mxnet-style RecordIO write
  per-image, our MTCNN   the same loop with gpu_align's MTCNN called on one photo at a time (what batching adds)

Memory: ``--rss 1000,20000`` reruns the pipeline from the first run's train.lst repeated to 1k and 20k photos (the
landmarks are reused, so no detection: decode, warp, encode and write at full speed) and reports the peak RSS of the
aligner and the packer processes: flat memory means it does not grow with the dataset.

Usage (from the repository root):
  python -m benchmarks.bench_pipeline [--device cpu|cuda] [--photos 240] [--baseline 40] [--rss 1000,20000]
                                      [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import RESULTS, ROOT, machine, write_section
from gpu_align.demo.data import build_demo_dataset
from gpu_align.pipeline import RunOptions, RunResult, run
from gpu_align.scan import scan_source
from packer import recordio


def _center_largest(boxes: np.ndarray, hw: tuple[int, int]) -> int:
    """InsightFace's align scripts: box area minus twice the squared offset of its centre from the image centre."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 - hw[1] / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - hw[0] / 2
    return int(np.argmax(area - 2.0 * (cx**2 + cy**2)))


def per_image_baseline(paths: list[str], out: Path, detect) -> float:
    """Seconds for the per-image loop over ``paths``; ``detect(rgb) -> (boxes (K, 4), landmarks (K, 5, 2))``."""
    from skimage.transform import SimilarityTransform

    template = np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    )
    t0 = time.perf_counter()
    with recordio.MXIndexedRecordIO(str(out / "base.idx"), str(out / "base.rec"), "w") as rec:
        for key, path in enumerate(paths):
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is None:
                continue
            boxes, lms = detect(np.ascontiguousarray(bgr[..., ::-1]))
            if len(boxes) == 0:
                continue
            lm = lms[_center_largest(boxes, bgr.shape[:2])]
            M = SimilarityTransform.from_estimate(lm, template).params[:2]
            crop = cv2.warpAffine(bgr, M, (112, 112), borderValue=0)
            _, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
            rec.write_idx(key, recordio.pack(recordio.IRHeader(0, 0, key, 0), jpg.tobytes()))
    return time.perf_counter() - t0


def facenet_detect(device: torch.device):
    """facenet-pytorch 2.6.0's ``detect_face`` (its own code and weights) on one photo, on ``device``."""
    from gpu_align.detect.mtcnn.reference import reference_detect

    def detect(rgb: np.ndarray):
        boxes, _, landmarks = reference_detect(rgb, device=device)
        return boxes, landmarks

    return detect


def ours_detect(device: torch.device):
    from gpu_align.detect.mtcnn import MTCNN

    mtcnn = MTCNN(device=device)

    def detect(rgb: np.ndarray):
        with torch.inference_mode():
            d = mtcnn.detect([rgb])[0]
        return d.boxes.cpu().numpy(), d.landmarks.cpu().numpy()

    return detect


def pipeline(photos: Path, out: Path, device: str, decoder: str, batch: int | None) -> RunResult:
    opts = RunOptions(
        src=str(photos), out=str(out), device=device, decoder=decoder, batch_size=batch, overwrite=True, quiet=True
    )
    return run(opts)


def rss_run(lst: Path, n: int, work: Path, device: str) -> dict:
    """Pipeline from ``lst`` repeated to ``n`` lines (fresh labels per repeat), in a subprocess; peak RSS in MB."""
    lines = lst.read_text(encoding="utf-8").splitlines()
    labels = sorted({int(line.split("\t")[2]) for line in lines})
    big = work / f"rss{n}.lst"
    with open(big, "w", encoding="utf-8") as f:
        k = 0
        while k < n:
            rep = k // len(lines)
            for line in lines[: n - k]:
                fields = line.split("\t")
                fields[2] = str(int(fields[2]) + rep * len(labels))
                f.write("\t".join(fields) + "\n")
            k += len(lines)
    out = work / f"rss{n}"
    cmd = [sys.executable, "-m", "gpu_align", "run", str(big), "--out", str(out), "--device", device, "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    extra = json.loads((out / "report.json").read_text(encoding="utf-8"))["extra"]
    shutil.rmtree(out)
    return {
        "n": n,
        "seconds": seconds,
        "main": extra["run"]["this_invocation"]["peak_rss_mb"],
        "packer": extra["packer"]["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decoder", default="auto", choices=("auto", "dali", "cpu"))
    ap.add_argument("--batch-size", type=int, default=None, help="pipeline batch (default: the run default)")
    ap.add_argument("--photos", type=int, default=240, help="photos in the demo folder (default 240)")
    ap.add_argument("--baseline", type=int, default=40, help="photos timed in the per-image loops (default 40)")
    ap.add_argument("--rss", default="", help="comma-separated photo counts for the memory check, e.g. 1000,20000")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--write-results", action="store_true", help="update the Pipeline section of RESULTS.md")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    photos = work / "photos"
    idents = max(4, args.photos // 12)
    build_demo_dataset(photos, identities=idents, images_per_identity=12, seed=1, overwrite=True)
    paths = [it.path for it in scan_source(photos).items]
    print(f"{len(paths)} photos of {idents} identities in {photos}", file=sys.stderr)

    res = pipeline(photos, work / "run", args.device, args.decoder, args.batch_size)
    rate = res.processed / res.seconds
    sample = paths[:: max(1, len(paths) // args.baseline)][: args.baseline]
    base_s = per_image_baseline(sample, work, facenet_detect(device))
    ours_s = per_image_baseline(sample, work, ours_detect(device))
    base_rate, ours_rate = len(sample) / base_s, len(sample) / ours_s

    t, p = res.times, res.packer
    stages = (
        f"decode {t.decode:.1f} s, detect {t.detect:.1f} s, refine {t.refine:.1f} s, warp {t.warp:.1f} s, "
        f"to host {t.transfer:.1f} s "
        f"(aligner process); encode {p.get('encode_s', 0):.1f} s, write {p.get('write_s', 0):.1f} s (packer "
        f"process, overlapped); scan {t.scan:.1f} s"
    )
    lines = [
        f"Machine: {machine()}.",
        "",
        f"{res.processed} photos ({idents} identities, demo_data seed 1, 150–800 px); device `{args.device}`, "
        f"decoder `{args.decoder}`, batch {res.report['extra']['run']['options']['batch_size']}. Faces stored: "
        f"{res.report['counts']['images']}. The per-image loops run on {len(sample)} of the same photos.",
        "",
        "| pipeline | photos/s | vs per-image baseline |",
        "| --- | ---: | ---: |",
        f"| gpu-align run (end to end, incl. start-up) | {rate:,.1f} | {rate / base_rate:.1f}× |",
        f"| per-image, facenet-pytorch MTCNN (baseline) | {base_rate:,.1f} | 1.0× |",
        f"| per-image, gpu_align MTCNN | {ours_rate:,.1f} | {ours_rate / base_rate:.1f}× |",
        "",
        f"Stage seconds of the run: {stages}.",
    ]
    if args.rss:
        rows = [rss_run(work / "run" / "train.lst", int(n), work, args.device) for n in args.rss.split(",")]
        lines += [
            "",
            "Memory (pipeline rerun from the run's train.lst, landmarks reused: no detection):",
            "",
            "| photos | seconds | photos/s | peak RSS aligner (MB) | peak RSS packer (MB) |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            rate_n = r["n"] / r["seconds"]
            lines.append(f"| {r['n']:,} | {r['seconds']:.1f} | {rate_n:,.0f} | {r['main']:,.0f} | {r['packer']:,.0f} |")
    cmd = "python -m benchmarks.bench_pipeline " + " ".join(a for a in sys.argv[1:] if a != "--write-results")
    lines += ["", f"Command: `{cmd.strip()}`."]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        write_section(f"Pipeline ({args.device})", text)
        print(f"\nupdated {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
