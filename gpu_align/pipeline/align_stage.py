"""The align stage of a run: one decoded batch -> the packer's :class:`~packer.process.CropBatch`.

It runs :class:`~gpu_align.align.FaceAligner` on the photos (or warps with a ``.lst``'s own landmarks, which are
not detected again), turns each photo into the packer's :class:`~packer.process.ItemMeta` (its ``train.lst``
line, or why it was skipped, and report notes such as several confident faces), and times the device stages.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from gpu_align.align import AlignResult, FaceAligner
from gpu_align.align.rows import Rows
from gpu_align.align.warp import center_crop_landmarks
from gpu_align.decode import DecodedBatch
from gpu_align.detect import Detections
from gpu_align.detect.select import segmented_argmax
from gpu_align.device import HostCopy, host_to_device
from gpu_align.pipeline.options import RunOptions, StageTimes
from gpu_align.scan import InputItem
from packer.lst import LstEntry, landmarks_outside
from packer.process import CropBatch, ItemMeta

LANDMARK_DECIMALS = 2  # train.lst precision; the fit uses the rounded landmarks so the .lst reproduces the crops


def _crop_name(path: str) -> str:
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    return f"{stem}.jpg" if ext.lower() in (".jpg", ".jpeg") else f"{name}.jpg"


def crop_names(items: list[InputItem]) -> list[str]:
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


def _lst_entry(path: str, box: np.ndarray | tuple[int, ...], lm: np.ndarray) -> LstEntry:
    """face2rec2 line of an aligned photo: aligned=0 (the path is the source photo), box, landmarks x1..x5 y1..y5."""
    return LstEntry(0, path, 0, tuple(round(float(v)) for v in box), tuple(float(v) for v in lm.T.reshape(-1)))


# --boxes-csv: a detected face is the listed photo's face when its box overlaps the reference box at least this
# much (intersection over union). VGGFace2's loose boxes are larger than MTCNN's tight ones (IoU ~0.4-0.6 for the
# same face), a neighbour's face overlaps them far less.
BOX_MATCH_IOU = 0.3
BOX_NOT_MATCHED = "box not matched"


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of ``(K, 4)`` boxes ``a`` and ``b``, all ``x1 y1 x2 y2``: ``(K,)``."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area_a, area_b = ((x[:, 2:] - x[:, :2]).clamp(min=0).prod(1) for x in (a, b))
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def _given_detections(item: InputItem, device: torch.device) -> Detections:
    """A ``.lst`` line's own landmarks as a one-face detection (the photo is not detected again)."""
    lm = host_to_device(item.landmarks, device, torch.float32).reshape(1, 5, 2)
    if item.bbox is not None:
        box = host_to_device([item.bbox], device, torch.float32)
    else:
        box = torch.cat([lm.amin(1), lm.amax(1)], dim=1)
    return Detections(box, torch.ones(1, device=device), lm)


class AlignStage:
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
        self.crop_names = crop_names(items) if opts.save_crops else None
        self._picked: dict[int, Detections] = {}  # input index -> the face --boxes-csv chose (see _match_boxes)

    def _as_failures(self, batch: DecodedBatch, bad: dict[int, str]) -> DecodedBatch:
        """``batch`` with its rows ``bad`` (batch row -> reason) moved to its failures (kept in index order)."""
        if not bad:
            return batch
        keep = Rows.where(k not in bad for k in range(len(batch)))
        failures = sorted(
            [*batch.failures, *((batch.indices[k], self.items[batch.indices[k]].path, r) for k, r in bad.items())]
        )
        return DecodedBatch(keep.take(batch.indices), keep.take(batch.images), failures)

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
        return self._as_failures(batch, bad)

    def _match_boxes(self, batch: DecodedBatch) -> DecodedBatch:
        """``--boxes-csv``: detect the photos that have a reference box (and no landmarks), keep the confident face
        that overlaps it best (:data:`BOX_MATCH_IOU`) as the photo's given detection; a photo where none does
        becomes a failure ``box not matched`` (never the face a heuristic picks)."""
        rows = [k for k, i in enumerate(batch.indices)
                if self.items[i].ref_box is not None and self.items[i].landmarks is None]
        if not rows:
            return batch
        t0 = time.perf_counter()
        found = self.aligner.detect([batch.images[k] for k in rows])
        self.times.detect += time.perf_counter() - t0
        # all photos' faces at once: (K,) faces, `img` the photo of each; below the floor a face is never chosen
        faces = Detections(*(torch.cat(parts) for parts in zip(*found, strict=True)))
        dev = faces.boxes.device
        img = torch.repeat_interleave(
            torch.arange(len(rows), device=dev), torch.tensor([len(d.scores) for d in found], device=dev)
        )
        refs = host_to_device([self.items[batch.indices[k]].ref_box for k in rows], dev, torch.float32)
        iou = torch.where(faces.scores >= self.aligner.min_score, _iou(faces.boxes, refs[img]), -1.0)
        best = segmented_argmax(iou, img, len(rows))  # (n,), K where a photo has no confident face
        best_iou = torch.cat([iou, iou.new_full((1,), -1.0)])[best]
        bad: dict[int, str] = {}
        for k, b, v in zip(rows, best.tolist(), best_iou.tolist(), strict=True):  # the one host sync
            if v >= BOX_MATCH_IOU:
                self._picked[batch.indices[k]] = Detections(*(x[b : b + 1] for x in faces))
            else:
                got = f"best IoU {v:.2f}" if v >= 0 else "no confident face"
                bad[k] = f"{BOX_NOT_MATCHED}: {got} with the --boxes-csv box (needs {BOX_MATCH_IOU})"
        return self._as_failures(batch, bad)

    def _given(self, batch: DecodedBatch) -> list[Detections | None]:
        """The ``.lst``'s (or ``--landmarks-csv``'s) landmarks where it has them, the face ``--boxes-csv`` chose
        (no detection in either case); None = detect this photo."""
        return [
            _given_detections(self.items[i], self.device) if self.items[i].landmarks is not None
            else self._picked.pop(i, None)
            for i in batch.indices
        ]

    def _failure_metas(self, batch: DecodedBatch, skip_below: int, counts: dict[str, int]) -> dict[int, ItemMeta]:
        """The batch's decode (and bad-landmark) failures not yet written, by input index."""
        metas: dict[int, ItemMeta] = {}
        for index, _path, reason in batch.failures:
            if index >= skip_below:
                it = self.items[index]
                metas[index] = ItemMeta(index, it.group, it.path, skip_reason=reason)
                counts["failed"] += 1
        return metas

    def start(self, batch: DecodedBatch, skip_below: int) -> PendingBatch:
        """Queue the alignment of ``batch`` and the copy of its results to the host; :meth:`PendingBatch.finish`
        makes the packer's message. Inputs with index < ``skip_below`` (already written) are left out of it.

        On CUDA nothing here waits for the warp or the copy: the caller decodes (and starts) the next batch, then
        finishes this one, so the device works while the host builds and sends the previous message.
        """
        batch = self._match_boxes(self._drop_bad_landmarks(batch))
        counts = dict(found=0, center=0, missed=0, failed=0)
        metas = self._failure_metas(batch, skip_below, counts)
        if not batch.images:
            return PendingBatch(self, batch, skip_below, counts, metas)
        res = self.aligner.align(batch.images, detections=self._given(batch))
        copy = HostCopy(res.crops, _per_photo(res, _round_landmarks(res.landmarks)))
        return PendingBatch(self, batch, skip_below, counts, metas, res, copy)

    def __call__(self, batch: DecodedBatch, skip_below: int) -> tuple[CropBatch, dict[str, int]]:
        """Align ``batch`` and make its message at once (:meth:`start`, then :meth:`PendingBatch.finish`)."""
        return self.start(batch, skip_below).finish()


# Columns of the per-photo host table (one copy to the host instead of one per field).
_OK, _CENTER, _MULTI, _FACES, _SCORE, _RU_SCORE = range(6)
_BOX, _RU_BOX, _LMS = slice(6, 10), slice(10, 14), slice(14, 24)


def _per_photo(res: AlignResult, lms: torch.Tensor) -> torch.Tensor:
    """``(B, 24)`` float32 on the device: ok, center, multi-face, confident faces, score, runner-up score, box,
    runner-up box, ``train.lst`` landmarks (x, y pairs); all float32 or small integers, so the values are exact."""
    multi = (res.num_confident >= 2) & res.found
    flags = (res.ok, res.center, multi, res.num_confident, res.scores, res.runner_up_scores)
    flags = torch.stack([f.float() for f in flags], 1)
    return torch.cat([flags, res.boxes, res.runner_up_boxes, lms.reshape(len(res), 10)], 1)


def _face(box: np.ndarray, score: float) -> dict[str, Any]:
    return {"box": [round(float(v), 1) for v in box], "score": round(score, 4)}


class PendingBatch:
    """One batch between :meth:`AlignStage.start` and its message: its host copy and what the message needs of the
    batch (input indices, photo sizes, miss reasons, stage times). The decoded photos and the device results are
    not kept, so their memory is free for the next batch while this one's copy lands."""

    def __init__(self, stage: AlignStage, batch: DecodedBatch, skip_below: int, counts: dict[str, int],
                 metas: dict[int, ItemMeta], res: AlignResult | None = None, copy: HostCopy | None = None):
        self.stage, self.skip_below, self.counts, self.metas, self.copy = stage, skip_below, counts, metas, copy
        self.indices = batch.indices
        self.hw = [tuple(im.shape[:2]) for im in batch.images]  # (H, W) per row: shapes only, no device read
        self.miss_reason = res.miss_reason if res is not None else []
        self.seconds = res.seconds if res is not None else {}

    def finish(self) -> tuple[CropBatch, dict[str, int]]:
        """Wait for the host copy and make the packer's message (metas in input order, the crops they name)."""
        size = self.stage.aligner.image_size
        crops = np.zeros((0, size, size, 3), np.uint8)
        if self.copy is not None:
            t0 = time.perf_counter()
            all_crops, table = (t.numpy() for t in self.copy.wait())
            crops = self._aligned(all_crops, table)
            self._add_times(time.perf_counter() - t0)
        return CropBatch([m for _, m in sorted(self.metas.items())], np.ascontiguousarray(crops)), self.counts

    def _add_times(self, transfer: float) -> None:
        times, seconds = self.stage.times, self.seconds  # the events have completed: reading them is free
        times.detect += seconds.get("detect", 0.0)
        times.refine += seconds.get("refine", 0.0)
        times.warp += seconds.get("warp", 0.0)
        times.transfer += transfer

    def _note(self, row: np.ndarray) -> dict[str, Any]:
        """A multi-face photo's report note: the policy's choice and its runner-up."""
        select = self.stage.aligner.select
        return {
            "kind": "multi-face",
            "faces": int(row[_FACES]),
            "select": select if isinstance(select, str) else "custom",
            "chosen": _face(row[_BOX], float(row[_SCORE])),
            "runner_up": _face(row[_RU_BOX], float(row[_RU_SCORE])),
        }

    def _center_landmarks(self, table: np.ndarray) -> dict[int, np.ndarray]:
        """Batch row -> ``(5, 2)`` ``train.lst`` landmarks of each centre-crop fallback: the centre crop's
        (:func:`~gpu_align.align.warp.center_crop_landmarks`, from the photo's size, rounded to the line's
        precision), which a ``.lst`` run recognises and warps with the centre-crop affine again (the rule:
        :data:`gpu_align.align.aligner.CENTER_MATCH_PX`). One host computation for all of them."""
        rows = [k for k in range(len(table)) if table[k, _CENTER] > 0]
        if not rows:
            return {}
        hw = [self.hw[k] for k in rows]
        size = self.stage.aligner.image_size
        lms = _round_landmarks(center_crop_landmarks([h for h, _ in hw], [w for _, w in hw], size))
        return dict(zip(rows, lms.numpy(), strict=True))

    def _aligned(self, all_crops: np.ndarray, table: np.ndarray) -> np.ndarray:
        """Add the metas of the aligned photos not yet written; returns their crops, ``(F, S, S, 3)`` uint8, in
        the order of the metas' ``row``."""
        stage, items = self.stage, self.stage.items
        ok = table[:, _OK] > 0
        sent = Rows.where(bool(o) and i >= self.skip_below for o, i in zip(ok, self.indices, strict=True))
        center_lms = self._center_landmarks(table)
        for k, i in enumerate(self.indices):
            if i < self.skip_below:
                continue
            it, row = items[i], table[k]
            if k in sent:
                center = row[_CENTER] > 0
                box = row[_BOX]
                lms = row[_LMS].reshape(5, 2)
                if center:  # a centre-crop fallback: the whole photo, the landmarks that make it again
                    h, w = self.hw[k]
                    box, lms = (0, 0, w, h), center_lms[k]
                lst = _lst_entry(it.path, box, lms)
                name = stage.crop_names[i] if stage.crop_names else ""
                note = self._note(row) if row[_MULTI] > 0 else None
                self.metas[i] = ItemMeta(i, it.group, it.path, sent.position(k), lst, None, name, note)
                self.counts["center" if center else "found"] += 1
            else:
                self.metas[i] = ItemMeta(i, it.group, it.path, skip_reason=self.miss_reason[k] or "no face")
                self.counts["missed"] += 1
        return all_crops[list(sent.ids)] if len(sent) != len(all_crops) else all_crops
