"""``gpu-align run``: scan → decode → detect → warp → (packer process) encode + write, resumable.

The main process owns the device: it decodes a batch (DALI on the GPU, or CPU threads), detects faces with the
batched MTCNN, warps the selected face of every photo in one batched call and copies the ``(F, S, S, 3)`` uint8
crops to the host. A separate packer process (:mod:`packer.channel`) encodes JPEGs and writes the dataset; the bounded
queue between the two is the back-pressure. Data flows one way; nothing here reaches back upstream.

Determinism and resume: decode batches are cut at multiples of ``batch_size`` of the input list. A resumed run
restarts at the batch that holds the first unwritten input and drops the inputs already written, so every photo is
detected in exactly the batch it had in an uninterrupted run: same detections, same crops, same bytes.
Landmarks are rounded to 1/100 px (what ``train.lst`` holds) before the similarity fit, so ``gpu-align pack`` of the
written ``train.lst`` rebuilds the same crops without detecting again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_align import __version__
from gpu_align.aligner import AlignResult, FaceAligner
from gpu_align.decode import DecodedBatch, make_decoder
from gpu_align.mtcnn import Detections
from gpu_align.scan import InputItem, Source, scan_source
from gpu_align.warp import arcface_template, invert_affine, transform_points
from packer.channel import PackerClient, PackerDied, WriterSettings
from packer.errors import UserError
from packer.layout import STATE_NAME
from packer.lst import LstEntry, landmarks_outside
from packer.process import CropBatch, ItemMeta, peak_rss_mb
from packer.report_html import write_report_html_or_warn

__all__ = ["INPUTS_NAME", "PackerDied", "RunOptions", "RunResult", "run"]

LANDMARK_DECIMALS = 2  # train.lst precision; the fit uses the rounded landmarks so the .lst reproduces the crops
# Beside pack.state.json while a run is unfinished: per input (identity, path, size, mtime, .lst landmarks),
# so that a --resume over changed inputs names the first changed file (the writer only keeps the overall hash).
INPUTS_NAME = "run.inputs.jsonl.gz"
_INPUTS_FORMAT = "gpu-align run inputs"


@dataclass
class RunOptions:
    """Settings of one run (the ``gpu-align run`` options; see ``gpu-align run --help``)."""

    src: str
    out: str
    lst_root: str | None = None  # folder that relative .lst paths start from (default: the .lst's)
    device: str = "auto"
    decoder: str = "auto"
    batch_size: int | None = None  # default: 256 on CUDA, 32 on CPU
    layout: str = "insightface"
    label_style: str = "scalar"
    image_size: int = 112
    quality: int = 95
    min_images: int = 1
    on_miss: str = "skip"
    select: str = "center-largest"
    min_face_rel: float = 0.1
    detector: str = "mtcnn"
    min_score: float | None = None  # confidence floor; None: the detector's default (MTCNN 0.9)
    refine: bool = False  # experimental O-Net landmark refinement; False: the detector's raw landmarks
    save_crops: str | None = None
    shuffle: int | None = None
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    limit: int | None = None
    threads: int | None = None
    fp16: bool = False
    queue_batches: int = 4
    quiet: bool = False


@dataclass
class StageTimes:
    """Seconds spent per stage in the main process (the packer's encode/write come back from its process)."""

    scan: float = 0.0
    decode: float = 0.0
    detect: float = 0.0
    refine: float = 0.0
    warp: float = 0.0
    transfer: float = 0.0
    queue_wait: float = 0.0


@dataclass
class RunResult:
    """What a finished run did; ``report`` is the ``report.json`` that was written."""

    out_dir: Path
    inputs: int
    processed: int  # inputs aligned by this invocation (fewer than ``inputs`` after --resume)
    found: int
    center: int
    missed: int
    failed: int
    seconds: float
    times: StageTimes
    packer: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------ helpers


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when torch sees a GPU, else CPU; an explicit ``cuda`` without a GPU, or ``cuda:N`` beyond
    the devices torch sees, is a one-line UserError."""
    from gpu_align.device import check_device

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    return check_device(dev, "--device")


def _crop_name(path: str) -> str:
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    return f"{stem}.jpg" if ext.lower() in (".jpg", ".jpeg") else f"{name}.jpg"


def _crop_names(items: list[InputItem]) -> list[str]:
    """``--save-crops`` file names, unique within each identity folder.

    ``a.jpg`` → ``a.jpg``, ``b.png`` → ``b.png.jpg``; photos of one identity whose names would clash (``a.jpg``,
    ``a.JPG``, ``a.jpeg``, or one name from two folders of a ``.lst``) all keep their extension (``a.jpg.jpg``,
    ``a.JPG.jpg``, ``a.jpeg.jpg``); a clash left after that gets ``_2``, ``_3``… in input order. Names are compared
    as written (like the photos' own: ``A.jpg`` and ``a.jpg`` stay apart on Linux). They depend only on the input
    list, so a resumed run writes the same ones.
    """
    names = [_crop_name(it.path) for it in items]
    by_group: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        by_group.setdefault(it.group, []).append(k)
    for ks in by_group.values():
        seen: dict[str, int] = {}
        for k in ks:
            seen[names[k]] = seen.get(names[k], 0) + 1
        for k in ks:
            if seen[names[k]] > 1:
                names[k] = os.path.basename(items[k].path) + ".jpg"
        taken: set[str] = set()
        for k in ks:
            stem, n = names[k][: -len(".jpg")], 1
            while names[k] in taken:
                n += 1
                names[k] = f"{stem}_{n}.jpg"
            taken.add(names[k])
    return names


def _round_landmarks(lm: torch.Tensor) -> torch.Tensor:
    scale = 10.0**LANDMARK_DECIMALS
    return torch.round(lm * scale) / scale


def _lst_entry(path: str, box: np.ndarray, lm: np.ndarray) -> LstEntry:
    """face2rec2 line of an aligned photo: aligned=0 (the path is the source photo), box, landmarks x1..x5 y1..y5."""
    return LstEntry(0, path, 0, tuple(round(float(v)) for v in box), tuple(float(v) for v in lm.T.reshape(-1)))


def _given_detections(item: InputItem, device: torch.device) -> Detections:
    """A ``.lst`` line's own landmarks as a one-face detection (the photo is not detected again)."""
    lm = torch.as_tensor(item.landmarks, dtype=torch.float32, device=device).reshape(1, 5, 2)
    if item.bbox is not None:
        box = torch.tensor([item.bbox], dtype=torch.float32, device=device)
    else:
        box = torch.cat([lm.amin(1), lm.amax(1)], dim=1)
    return Detections(box, torch.ones(1, device=device), lm)


# ------------------------------------------------------------------------------------------------ the stages


class _Aligner:
    """Detect (or take the ``.lst``'s landmarks) and warp one decoded batch; times each stage."""

    def __init__(self, opts: RunOptions, device: torch.device, items: list[InputItem], times: StageTimes):
        self.aligner = FaceAligner(
            device=device,
            image_size=opts.image_size,
            select=opts.select,
            min_face_rel=opts.min_face_rel,
            on_miss=opts.on_miss,
            refine=opts.refine,
            detector=opts.detector,
            min_score=opts.min_score,
            fp16=opts.fp16,
            landmark_decimals=LANDMARK_DECIMALS,
            timed=True,
        )
        self.device = device
        self.items = items
        self.times = times
        self.template = arcface_template(opts.image_size, device=device)
        self.crop_names = _crop_names(items) if opts.save_crops else None

    def _drop_bad_landmarks(self, batch: DecodedBatch) -> DecodedBatch:
        """Photos whose ``.lst`` landmarks cannot place a face (parse-time ``bad_landmarks``, or points more than
        one inter-ocular distance outside the decoded photo) become failures: never a black crop, never detected."""
        bad: dict[int, str] = {}
        for k, i in enumerate(batch.indices):
            it = self.items[i]
            if it.bad_landmarks is not None:
                bad[k] = it.bad_landmarks
            elif it.landmarks is not None:
                h, w = batch.images[k].shape[:2]
                why = landmarks_outside(it.landmarks.T.reshape(-1).tolist(), w, h)  # (5, 2) -> x1..x5 y1..y5
                if why is not None:
                    bad[k] = f"bad landmarks: {why}"
        if not bad:
            return batch
        keep = [k for k in range(len(batch.indices)) if k not in bad]
        failures = sorted(
            [*batch.failures, *((batch.indices[k], self.items[batch.indices[k]].path, r) for k, r in bad.items())]
        )
        return DecodedBatch([batch.indices[k] for k in keep], [batch.images[k] for k in keep], failures)

    def _given(self, batch: DecodedBatch) -> list[Detections | None]:
        """The ``.lst``'s own landmarks where it has them (no detection); None = detect this photo."""
        return [
            _given_detections(self.items[i], self.device) if self.items[i].landmarks is not None else None
            for i in batch.indices
        ]

    def _multi_face_notes(self, res: AlignResult) -> dict[int, dict[str, Any]]:
        """Per batch row with several confident faces: the policy's choice and its runner-up, for report.json."""
        multi = ((res.num_confident >= 2) & res.found).nonzero()[:, 0].tolist()
        if not multi:
            return {}
        rows = torch.tensor(multi, device=res.found.device)
        n = res.num_confident[rows].tolist()
        box, score = res.boxes[rows].cpu().numpy(), res.scores[rows].tolist()
        ru_box, ru_score = res.runner_up_boxes[rows].cpu().numpy(), res.runner_up_scores[rows].tolist()

        def face(b: np.ndarray, p: float) -> dict[str, Any]:
            return {"box": [round(float(v), 1) for v in b], "score": round(p, 4)}

        return {
            k: {
                "kind": "multi-face",
                "faces": n[j],
                "select": self.aligner.select if isinstance(self.aligner.select, str) else "custom",
                "chosen": face(box[j], score[j]),
                "runner_up": face(ru_box[j], ru_score[j]),
            }
            for j, k in enumerate(multi)
        }

    def __call__(self, batch: DecodedBatch, skip_below: int) -> tuple[CropBatch, dict[str, int]]:
        """Align ``batch``; inputs with index < ``skip_below`` (already written) are left out of the message."""
        batch = self._drop_bad_landmarks(batch)
        counts = dict(found=0, center=0, missed=0, failed=0)
        metas: dict[int, ItemMeta] = {}
        for index, _path, reason in batch.failures:
            if index >= skip_below:
                it = self.items[index]
                metas[index] = ItemMeta(index, it.group, it.path, skip_reason=reason)
                counts["failed"] += 1
        crops = np.zeros((0, self.aligner.image_size, self.aligner.image_size, 3), np.uint8)
        if batch.images:
            res = self.aligner.align(batch.images, detections=self._given(batch))
            t2 = time.perf_counter()
            ok = res.ok
            crops = res.crops[ok].cpu().numpy()
            # Centre-crop fallbacks get the landmarks that reproduce them (template mapped back to the photo).
            lms = torch.where(
                res.center[:, None, None],
                transform_points(invert_affine(res.transforms), self.template.expand(len(res), 5, 2)),
                res.landmarks,
            )
            lms = _round_landmarks(lms).cpu().numpy()
            boxes = res.boxes.cpu().numpy()
            ok_l, center_l = ok.tolist(), res.center.tolist()
            notes = self._multi_face_notes(res)
            t3 = time.perf_counter()
            self.times.detect += res.seconds.get("detect", 0.0)
            self.times.refine += res.seconds.get("refine", 0.0)
            self.times.warp += res.seconds.get("warp", 0.0)
            self.times.transfer += t3 - t2
            row = 0
            for k, i in enumerate(batch.indices):
                it = self.items[i]
                if ok_l[k]:
                    if center_l[k]:
                        h, w = batch.images[k].shape[:2]
                        boxes[k] = (0, 0, w, h)
                    if i >= skip_below:
                        lst = _lst_entry(it.path, boxes[k], lms[k])
                        name = self.crop_names[i] if self.crop_names else ""
                        metas[i] = ItemMeta(i, it.group, it.path, row, lst, None, name, notes.get(k))
                        counts["center" if center_l[k] else "found"] += 1
                    row += 1
                elif i >= skip_below:
                    metas[i] = ItemMeta(i, it.group, it.path, skip_reason=res.miss_reason[k] or "no face")
                    counts["missed"] += 1
        # Rows of inputs that were already written are dropped; re-number the rest compactly.
        keep_rows = [m.row for _, m in sorted(metas.items()) if m.row >= 0]
        if len(keep_rows) != len(crops):
            crops = crops[keep_rows]
        remap = {r: n for n, r in enumerate(keep_rows)}
        ordered = [
            m if m.row < 0 else dataclasses.replace(m, row=remap[m.row])
            for _, m in sorted(metas.items())
        ]
        return CropBatch(ordered, np.ascontiguousarray(crops)), counts


def _start_packer(opts: RunOptions, source: Source, fingerprint: str) -> PackerClient:
    """The packer process for ``opts``: its writer settings, JPEG encode and queue bound."""
    writer = WriterSettings(
        out_dir=opts.out,
        layout=opts.layout,
        label_style=opts.label_style,
        image_size=opts.image_size,
        min_images=opts.min_images,
        shuffle_seed=opts.shuffle,
        resume=opts.resume,
        overwrite=opts.overwrite,
        config=_input_config(opts, source, fingerprint),
        companions=(INPUTS_NAME,),
    )
    threads = min(8, max(1, (os.cpu_count() or 1) // 2))  # JPEG encode threads: half the cores, at most 8
    return PackerClient(
        writer, quality=opts.quality, save_crops=opts.save_crops, threads=threads, queue_batches=opts.queue_batches
    )


def _input_config(opts: RunOptions, source: Source, fingerprint: str | None = None) -> dict[str, Any]:
    """What must not change between a run and its --resume (the writer refuses a mismatch).

    ``fingerprint``: :meth:`Source.fingerprint` (paths, identities, file sizes and mtimes, .lst landmarks), when
    the caller has it already.
    """
    return {
        "command": "run",
        "source": source.root,
        "inputs": len(source.items),
        "fingerprint": fingerprint or source.fingerprint(),
        "shard": list(opts.shard) if opts.shard else None,
        "quality": opts.quality,
        "select": opts.select,
        "min_face_rel": opts.min_face_rel,
        "on_miss": opts.on_miss,
        "detector": opts.detector,
        "min_score": opts.min_score,
        "refine": opts.refine,
        "batch_size": opts.batch_size,
    }


def _versions() -> dict[str, str]:
    import cv2

    v = {"gpu-align": __version__, "python": platform.python_version(), "torch": str(torch.__version__)}
    v |= {"numpy": np.__version__, "opencv": cv2.__version__}
    with contextlib.suppress(ImportError):
        import nvidia.dali

        v["dali"] = nvidia.dali.__version__
    return v


def _progress(opts: RunOptions, total: int, initial: int):
    """The progress bar counts this invocation's work only (``total - initial``), so its rate and ETA are this
    run's: with ``initial=done`` a resume's first ETA would mix in inputs that the interrupted run did."""
    from tqdm import tqdm

    return tqdm(
        total=total - initial,
        unit="img",
        desc=f"aligning (resumed at {initial:,} of {total:,})" if initial else "aligning",
        disable=opts.quiet,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------ run


def _check_folder(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be one (a file, below a file, not writable) before any model loads."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UserError(f"{flag} {path} is a link to nothing (or a link loop); choose a folder")
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose a new or empty folder")
    where = p
    while not where.exists() and where.parent != where:  # the nearest existing folder above: where it is created
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{flag} {path}: {where} is a file, so no folder can be made below it; choose another path")
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".gpu-align-probe-"):  # the real test (root, read-only mounts)
            pass
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot write in {where} ({e.strerror or e}); choose a folder you can write to"
        ) from None


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _when(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


def _input_difference(old: list[list], new: list[list]) -> str:
    """The first difference between the per-input records of the interrupted run and of this one, in words."""
    if [r[:2] for r in old] != [r[:2] for r in new]:
        old_paths, new_paths = {r[1] for r in old}, {r[1] for r in new}
        added = [r[1] for r in new if r[1] not in old_paths]
        removed = [r[1] for r in old if r[1] not in new_paths]
        more = lambda n: f" and {n - 1} more" if n > 1 else ""  # noqa: E731
        if added:
            return f"{_shown(added[0])}{more(len(added))} {'is' if len(added) == 1 else 'are'} new"
        if removed:
            return f"{_shown(removed[0])}{more(len(removed))} {'is' if len(removed) == 1 else 'are'} gone"
        for (g0, p0, *_), (g1, p1, *_) in zip(old, new, strict=False):
            if p0 != p1:
                return f"the photos are in another order from {_shown(p1)} on"
            if g0 != g1:
                return f"{_shown(p1)} is now in identity {g1!r} (was {g0!r})"
    changed = [(o, n) for o, n in zip(old, new, strict=True) if o[2:] != n[2:]]
    if not changed:
        return "the inputs differ"
    (_, path, size0, mtime0, shape0), (_, _, size1, mtime1, shape1) = changed[0]
    if size0 != size1:
        detail = "it cannot be read now" if size1 < 0 else f"size {size0} → {size1}" if size0 >= 0 else "readable now"
    elif mtime0 != mtime1:
        detail = f"modified {_when(mtime0)} → {_when(mtime1)}"
    else:
        detail = f"box and landmarks in the .lst: {shape0 or 'none'} → {shape1 or 'none'}"
    more = f"; {len(changed) - 1} more changed" if len(changed) > 1 else ""
    return f"{_shown(path)} changed since the interrupted run ({detail}){more}"


def _check_inputs(out: Path, fingerprint: str, records: list[list]) -> bool:
    """On --resume: refuse inputs that changed since the interrupted run, naming the first changed file.

    Returns whether ``INPUTS_NAME`` already describes these inputs. Without it (killed before it was written, or
    unreadable) the writer's own check of the overall fingerprint still refuses a change, just less precisely.
    """
    if not (out / STATE_NAME).is_file():
        return False  # nothing unfinished to resume: the writer decides
    try:
        with gzip.open(out / INPUTS_NAME, "rt", encoding="ascii") as f:
            head = json.loads(f.readline())
            if not isinstance(head, dict) or head.get("format") != _INPUTS_FORMAT:
                return False
            if head.get("fingerprint") == fingerprint:
                return True
            old = json.loads(f.readline())
    except (OSError, EOFError, ValueError, zlib.error):
        return False
    raise UserError(
        f"{out} was written from other inputs: {_input_difference(old, records)}; rerun with the inputs of the "
        "interrupted run, or use --overwrite to start again"
    )


def _write_inputs(out: Path, fingerprint: str, records: list[list]) -> None:
    """Write ``INPUTS_NAME`` atomically: a JSON header line, then all records as one JSON list (one C-speed
    ``json`` call each way), ASCII-escaped, gzip level 1: ~20 bytes and ~4 µs per input."""
    tmp = out / (INPUTS_NAME + ".tmp")
    with gzip.open(tmp, "wt", encoding="ascii", compresslevel=1) as f:
        f.write(json.dumps({"format": _INPUTS_FORMAT, "fingerprint": fingerprint, "inputs": len(records)}) + "\n")
        f.write(json.dumps(records) + "\n")
    os.replace(tmp, out / INPUTS_NAME)


def _report_extra(
    opts: RunOptions,
    device: torch.device,
    decoder: Any,
    source: Source,
    done: int,
    processed: int,
    counts: dict[str, int],
    times: StageTimes,
    t_start: float,
) -> dict[str, Any]:
    """What this invocation adds to report.json (under ``extra``): settings, versions, device, counts, timings."""
    seconds = time.perf_counter() - t_start  # RunResult.seconds is this same number (the printed summary)
    return {
        "run": {
            "options": {k: v for k, v in asdict(opts).items() if k not in ("quiet",)},
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "decoder": repr(decoder) if decoder else None,
            "versions": _versions(),
            "scan_skipped": [{"path": p, "reason": r} for p, r in source.skipped],
            "this_invocation": {
                "resumed_at": done,
                "processed": processed,
                **counts,
                "seconds": round(seconds, 3),
                "images_per_second": round(processed / seconds, 1) if seconds > 0 else None,
                "stage_seconds": {k: round(v, 3) for k, v in asdict(times).items()},
                "peak_rss_mb": peak_rss_mb(),
            },
        }
    }


def _align_all(
    opts: RunOptions,
    items: list[InputItem],
    done: int,
    decoder: Any,
    aligner: _Aligner,
    packer: PackerClient,
    times: StageTimes,
    counts: dict[str, int],
) -> int:
    """Decode, align and send every input from ``done`` on; returns how many were sent."""
    if done >= len(items):
        return 0
    start = (done // opts.batch_size) * opts.batch_size  # restart at the batch boundary: the same batches
    processed = 0
    with _progress(opts, len(items), done) as bar:
        batches = decoder.batches((it.index, it.path) for it in items[start:])
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            times.decode += time.perf_counter() - t0
            if batch is None:
                return processed
            packer.check()
            msg, c = aligner(batch, skip_below=done)
            for k in counts:
                counts[k] += c[k]
            if msg.items:
                times.queue_wait += packer.send(msg)
                processed += len(msg.items)
                bar.update(len(msg.items))
                bar.set_postfix(
                    faces=counts["found"],
                    missed=counts["missed"] + counts["center"],
                    bad=counts["failed"],
                    refresh=False,
                )


def run(opts: RunOptions) -> RunResult:
    """Run the whole pipeline; returns what it did. Raises :class:`UserError` for anything the user can fix.

    Ctrl-C (KeyboardInterrupt) stops cleanly: the packer stops at its next input and keeps everything committed
    for ``resume``, and the KeyboardInterrupt is re-raised (``gpu-align run`` then prints how to continue).
    """
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    if opts.batch_size is None:
        opts.batch_size = 256 if device.type == "cuda" else 32
    if opts.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {opts.batch_size}")  # the CLI shows its flags
    if not 1 <= opts.quality <= 100:
        raise UserError(f"quality must be in 1..100, got {opts.quality}")
    _check_folder(opts.out, "--out")
    if opts.save_crops:
        _check_folder(opts.save_crops, "--save-crops")
    times = StageTimes()
    source = scan_source(
        opts.src, min_images=opts.min_images, shard=opts.shard, limit=opts.limit, lst_root=opts.lst_root
    )
    records = source.input_records()
    fingerprint = source.fingerprint(records)
    out = Path(opts.out)
    known = opts.resume and _check_inputs(out, fingerprint, records)
    times.scan = time.perf_counter() - t_start
    items = source.items
    # Models and decoder first: a setting they reject (e.g. --fp16 on CPU) then fails before DIR is touched.
    aligner = _Aligner(opts, device, items, times)
    decoder = make_decoder(opts.decoder, device=device, threads=opts.threads, batch_size=opts.batch_size)
    counts = dict(found=0, center=0, missed=0, failed=0)
    try:
        packer = _start_packer(opts, source, fingerprint)
        try:
            done = packer.ready()
            if not known and (out / STATE_NAME).is_file():  # unfinished from here on: keep the per-input detail
                _write_inputs(out, fingerprint, records)
            processed = _align_all(opts, items, done, decoder, aligner, packer, times, counts)
            extra = _report_extra(opts, device, decoder, source, done, processed, counts, times, t_start)
            finished = packer.finish(extra)
        except BaseException:  # Ctrl-C included: the packer keeps everything committed, resumable
            packer.abort()
            raise
    finally:
        decoder.close()
    for name in (INPUTS_NAME, INPUTS_NAME + ".tmp"):  # finished: the state it accompanied is gone too
        with contextlib.suppress(OSError):
            (out / name).unlink()
    write_report_html_or_warn(out)
    return RunResult(
        out_dir=Path(opts.out),
        inputs=len(items),
        processed=processed,
        found=counts["found"],
        center=counts["center"],
        missed=counts["missed"],
        failed=counts["failed"],
        seconds=extra["run"]["this_invocation"]["seconds"],  # the report's number: printed and reported agree
        times=times,
        packer=finished.stats,
        report=finished.report,
    )

