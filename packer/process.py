"""The packer process of ``gpu-align run``: aligned crops in, JPEG-encoded RecordIO dataset out.

The aligner (main process) sends :class:`CropBatch` messages through a bounded ``multiprocessing`` queue; this
process encodes the crops as JPEG (OpenCV, on a thread pool: ``cv2.imencode`` releases the GIL) and feeds them, in
input order, to :class:`packer.layout.DatasetWriter`; batch N+1 is encoded while batch N is written. The queue's
bound is the back-pressure: when encoding or the disk falls behind, the aligner blocks on ``put`` instead of
piling crops up in memory.

Protocol (main → packer, on ``inbox``): ``("batch", CropBatch)`` …, then ``("end", extra)`` to finish the dataset
(``extra``: JSON-able run details for ``report.json``) or ``("abort", None)`` to stop and keep it resumable.
Replies (packer → main, on ``outbox``): ``("ready", done)`` once the writer is open (``done`` = inputs already
written, for ``--resume``), then ``("done", stats)``, ``("aborted", done)`` or ``("error", message)``.
The process never imports torch.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.errors import UserError
from packer.layout import DatasetWriter, PackItem
from packer.lst import LstEntry
from packer.recordio import RecordIOError

__all__ = ["CropBatch", "ItemMeta", "encode_jpeg", "packer_main", "peak_rss_mb"]

_POLL_S = 1.0  # how often an idle packer checks that its parent is still alive


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


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


class _Stopped(Exception):
    """The aligner asked to stop (Ctrl-C): abort between two inputs instead of draining the queue first."""


def packer_main(
    inbox: Any,
    outbox: Any,
    writer_args: dict[str, Any],
    quality: int,
    save_crops: str | None,
    threads: int,
    parent_pid: int,
    stop: Any = None,
) -> None:
    """Entry point of the packer process (``multiprocessing`` target). See the module docstring for the protocol.

    ``stop``: an optional ``multiprocessing.Event``; once set, the packer aborts (keeping what is committed) at the
    next input, even with batches still queued.
    """
    # Ctrl-C, a terminal hang-up or a service stop reach the whole process group: the parent decides, this process
    # waits for its "abort" (and, should the parent die, notices it within _POLL_S and keeps what is committed).
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    stats = PackerStats()
    try:
        writer = DatasetWriter(**writer_args)
    except (UserError, RecordIOError, OSError) as e:
        outbox.put(("error", _describe(e)))
        return
    outbox.put(("ready", writer.done))
    crops_root = Path(save_crops) if save_crops else None
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="encode")
    pending = None  # (batch, its encode futures): encoded while the next batch arrives, then written
    try:
        while True:
            t0 = time.perf_counter()
            try:
                kind, payload = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not _parent_alive(parent_pid):  # the aligner died (kill -9): keep what is committed
                    writer.abort()
                    return
                if pending is not None:  # nothing new to encode meanwhile: write what is encoded
                    _write_batch(writer, *pending, crops_root, stats, stop)
                    pending = None
                continue
            finally:
                stats.wait_s += time.perf_counter() - t0
            if kind == "abort" or (stop is not None and stop.is_set() and kind == "batch"):
                raise _Stopped
            if kind == "end":
                if pending is not None:  # the last batch's crops are encoded: write them
                    _write_batch(writer, *pending, crops_root, stats, stop)
                    pending = None
                extra = dict(payload or {})
                extra["packer"] = {k: round(v, 3) for k, v in vars(stats).items() if k.endswith("_s")}
                extra["packer"]["peak_rss_mb"] = peak_rss_mb()
                t0 = time.perf_counter()
                summary = writer.close(report_extra=extra)
                stats.write_s += time.perf_counter() - t0
                stats.summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(summary).items()}
                outbox.put(("done", vars(stats)))
                return
            # Encode this batch on the pool while the previous one (encoded already) is written: the disk and the
            # encoder threads overlap instead of taking turns.
            encoding = (payload, _encode_batch(payload, quality, pool))
            if pending is not None:
                _write_batch(writer, *pending, crops_root, stats, stop)
            pending = encoding
    except _Stopped:
        writer.abort()
        outbox.put(("aborted", writer.done))
    except (UserError, RecordIOError, OSError) as e:
        writer.abort()
        outbox.put(("error", _describe(e)))
    except BaseException as e:  # a bug: say what it was, keep the dataset resumable
        writer.abort()
        outbox.put(("error", f"packer process failed: {type(e).__name__}: {e}"))
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    return str(e)
