"""The packer process of ``gpu-align run``: aligned crops in, JPEG-encoded RecordIO dataset out.

The aligner (main process) sends :class:`CropBatch` messages through a bounded ``multiprocessing`` queue; this
process encodes the crops as JPEG (OpenCV, on a thread pool: ``cv2.imencode`` releases the GIL) and feeds them, in
input order, to :class:`packer.layout.DatasetWriter`; batch N+1 is encoded while batch N is written. The queue's
bound is the back-pressure: when encoding or the disk falls behind, the aligner blocks on ``put`` instead of
piling crops up in memory.

The messages, the settings, the process entry (:func:`packer.channel.packer_main`, re-exported here) and the
main process's end: :mod:`packer.channel`. This module is the work: crops, their JPEG encode, their write.
The process never imports torch.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.layout import DatasetWriter, PackItem
from packer.lst import LstEntry

__all__ = ["CropBatch", "ItemMeta", "encode_jpeg", "peak_rss_mb"]  # and packer_main, from packer.channel


@dataclass(frozen=True)
class ItemMeta:
    """One input of the run, in input order.

    Attributes:
        index: position in the run's input list.
        group: identity (source folder name, or the .lst label).
        source: source path as given (written to the report and to ``train.lst``).
        row: row of this input's crop in :attr:`CropBatch.crops`, or -1 when it produced none.
        lst: the ``train.lst`` line (box and landmarks of the detection); None when no crop.
        skip_reason: why there is no crop (``"kind: detail"``).
        crop_name: file name for ``--save-crops`` (``<identity>/<name>.jpg``).
        note: facts for ``report.json``'s ``notes`` (:attr:`packer.layout.PackItem.note`), e.g. a multi-face photo.
    """

    index: int
    group: str
    source: str
    row: int = -1
    lst: LstEntry | None = None
    skip_reason: str | None = None
    crop_name: str = ""
    note: dict[str, Any] | None = None


@dataclass
class CropBatch:
    """Crops of consecutive inputs: ``crops`` is ``(F, S, S, 3)`` uint8 RGB on the host, one row per found face."""

    items: list[ItemMeta]
    crops: np.ndarray


@dataclass
class PackerStats:
    """What the packer process spent its time on (seconds), for the run's stage breakdown."""

    encode_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    crops: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def encode_jpeg(crop: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of one ``(S, S, 3)`` uint8 RGB crop (RGB-correct: OpenCV is given BGR, as it expects)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a crop as JPEG")
    return buf.tobytes()


def _save_crop(root: Path, meta: ItemMeta, body: bytes) -> None:
    path = root / meta.group / meta.crop_name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


class _Stopped(Exception):
    """The aligner asked to stop (Ctrl-C): abort between two inputs instead of draining the queue first."""


def _encode_batch(batch: CropBatch, quality: int, pool: ThreadPoolExecutor) -> list[Future[bytes]]:
    """Start the JPEG encode of every crop of ``batch`` on ``pool``: one future per crop row."""
    return [pool.submit(encode_jpeg, c, quality) for c in batch.crops]


def _write_batch(
    writer: DatasetWriter,
    batch: CropBatch,
    encoded: list[Future[bytes]],
    crops_root: Path | None,
    stats: PackerStats,
    stop: Any = None,
) -> None:
    """Write ``batch``'s items in input order, waiting for their encodes (``stats.encode_s``: the wait only)."""
    t0 = time.perf_counter()
    bodies = [f.result() for f in encoded]
    stats.encode_s += time.perf_counter() - t0
    stats.crops += len(bodies)
    t0 = time.perf_counter()
    for meta in batch.items:
        if stop is not None and stop.is_set():
            raise _Stopped
        body = bodies[meta.row] if meta.row >= 0 else None
        item = PackItem(meta.group, body, meta.lst, meta.source, meta.skip_reason, meta.note)
        writer.add(item)
        if crops_root is not None and body is not None:
            _save_crop(crops_root, meta, body)
    stats.write_s += time.perf_counter() - t0


def __getattr__(name: str) -> Any:
    # packer_main lives in packer.channel (which imports this module): re-exported lazily, no import cycle.
    if name == "packer_main":
        from packer.channel import packer_main

        return packer_main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
