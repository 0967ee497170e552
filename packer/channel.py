"""The channel between ``gpu-align run``'s main process and its packer process: messages, settings, both ends.

Protocol — the only place it is defined. Two ``multiprocessing`` queues and one event, created by
:class:`PackerClient` (main process) and handed to :func:`packer_main` (the spawned packer process):

- ``inbox`` (main → packer, bounded: its bound is the back-pressure): :class:`Batch` …, then exactly one of
  :class:`End` (finish the dataset; ``extra`` = JSON-able run details for ``report.json``) or :class:`Abort` (stop,
  keep what is committed, resumable).
- ``outbox`` (packer → main): :class:`Ready` once the writer is open (``done`` = inputs already written, which a
  ``--resume`` skips), then exactly one of :class:`Done` (``stats`` = :class:`packer.process.PackerStats` as a dict
  with the writer's summary, ``report`` = the ``report.json`` it wrote), :class:`Aborted` (``done`` = inputs a resume
  keeps) or :class:`PackerError` (``message``: one line for the user). A :class:`PackerError` may come instead of
  :class:`Ready` (the writer refused to open ``out_dir``) or at any time after it.
- ``stop`` (a :class:`StopFlag`, set by :meth:`PackerClient.abort`, e.g. on Ctrl-C): the packer aborts at its
  next input, even with batches still queued.

The packer ignores SIGINT/SIGTERM/SIGHUP (the parent decides), and aborts by itself when its parent dies. The client
watches the packer in every wait: a packer that ends without a reply is :class:`PackerDied`. Neither end imports
torch; the packer's target and arguments come from ``packer`` alone, so the child never re-imports the caller's
``__main__`` either (:func:`_caller_main_hidden`).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from packer.errors import UserError
from packer.layout import DatasetWriter
from packer.process import CropBatch, PackerStats, _encode_batch, _Stopped, _write_batch, peak_rss_mb
from packer.recordio import RecordIOError

__all__ = [
    "Abort",
    "Aborted",
    "Batch",
    "Done",
    "End",
    "PackerClient",
    "PackerDied",
    "PackerError",
    "Ready",
    "WriterSettings",
    "packer_main",
]

_POLL_S = 1.0  # how often an idle packer checks that its parent is still alive
_WAIT_S = 0.2  # how often a waiting client checks that the packer is still alive


# ------------------------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Batch:
    """main → packer: crops of consecutive inputs, to encode and write in input order."""

    batch: CropBatch


@dataclass(frozen=True)
class End:
    """main → packer: no more batches; finish the dataset with ``extra`` under ``report.json``'s ``"extra"``."""

    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Abort:
    """main → packer: stop now, keep what is committed (resumable)."""


@dataclass(frozen=True)
class Ready:
    """packer → main: the writer is open; ``done`` inputs are written already (``--resume`` skips them)."""

    done: int


@dataclass(frozen=True)
class Done:
    """packer → main: the dataset is finished. ``stats``: :class:`PackerStats` fields (``summary``: the writer's
    :class:`packer.layout.WriteSummary` as plain values); ``report``: the ``report.json`` the writer wrote."""

    stats: dict[str, Any]
    report: dict[str, Any]


@dataclass(frozen=True)
class Aborted:
    """packer → main: stopped as asked; ``done`` inputs are committed (what a resume keeps)."""

    done: int


@dataclass(frozen=True)
class PackerError:
    """packer → main: the packer failed (``message``: one line for the user); the dataset stays resumable."""

    message: str


ToPacker = Batch | End | Abort
FromPacker = Ready | Done | Aborted | PackerError


@dataclass(frozen=True)
class WriterSettings:
    """The :class:`packer.layout.DatasetWriter` the packer opens (see its arguments); plain, picklable values."""

    out_dir: str
    layout: str = "insightface"
    label_style: str = "scalar"
    image_size: int | tuple[int, int] = (112, 112)
    min_images: int = 1
    shuffle_seed: int | None = None
    resume: bool = False
    overwrite: bool = False
    write_lst: bool = True
    config: dict[str, Any] | None = None
    commit_interval: float = 1.0
    companions: tuple[str, ...] = ()

    def open(self) -> DatasetWriter:
        # the fields are DatasetWriter's keywords: a new writer option is one field here (shallow: config stays as is)
        return DatasetWriter(**{f.name: getattr(self, f.name) for f in fields(self)})


# ------------------------------------------------------------------------------------------------ main process


class PackerDied(UserError):
    """The packer process ended without a reply (killed, out of memory): what it committed is kept, resumable."""


def _packer_error(message: str) -> UserError:
    return UserError(f"{message} — nothing written so far is lost: fix it and rerun with --resume")


@contextlib.contextmanager
def _caller_main_hidden() -> Iterator[None]:
    """While a spawned child starts, let multiprocessing see a ``__main__`` with neither a spec nor a file.

    ``multiprocessing.spawn.get_preparation_data`` (the same in Python 3.4-3.13) records the caller's main module
    (``init_main_from_name`` / ``init_main_from_path``) and the child re-imports it as ``__mp_main__`` before it
    unpickles its target: a plain script that calls ``run()`` at top level (no ``if __name__ == "__main__":``)
    would run its top-level code again in the packer and die in the spawn bootstrap check. The packer's target and
    arguments come from ``packer`` alone, so the child needs nothing of ``__main__``; an interactive session (no
    spec, no file) is exactly this case. Only ``Process.start()`` runs inside, on the calling thread.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            sys.modules.pop("__main__", None)
        else:
            sys.modules["__main__"] = main


class StopFlag:
    """A stop request shared with the packer process, without a lock: a packer killed while reading a
    ``multiprocessing.Event`` can leave the event's internal lock taken, and the main process's next ``set()``
    would then block for ever. One shared byte has no lock to leave behind."""

    def __init__(self, ctx: Any):
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


class PackerClient:
    """The main process's end: starts the packer process; every wait also watches for its errors and its death.

    Args:
        writer: the dataset writer the packer opens.
        quality: JPEG quality of the stored crops (1..100).
        save_crops: also write every crop as ``<save_crops>/<identity>/<name>.jpg``; None = no.
        threads: JPEG encode threads in the packer.
        queue_batches: bound of the inbox in batches (the back-pressure).
    """

    def __init__(
        self, writer: WriterSettings, *, quality: int, save_crops: str | None, threads: int, queue_batches: int
    ):
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA state
        self.inbox = ctx.Queue(maxsize=max(1, queue_batches))
        self.outbox = ctx.Queue()
        self.stop = StopFlag(ctx)  # set on Ctrl-C: the packer aborts at its next input, queued batches or not
        self.proc = ctx.Process(
            target=packer_main,
            args=(self.inbox, self.outbox, writer, quality, save_crops, threads, os.getpid(), self.stop),
            name="gpu-align-packer",
            daemon=True,
        )
        with _caller_main_hidden():  # the packer never re-imports (or re-runs) the caller's script
            self.proc.start()

    def _died(self) -> PackerDied:
        code = self.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return PackerDied(f"the packer process died ({how})")

    def _reply(self, timeout: float | None = None, opening: bool = False) -> Ready | Done | Aborted:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg: FromPacker = self.outbox.get(timeout=_WAIT_S)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise self._died() from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError from None
                continue
            if isinstance(msg, PackerError):
                # The writer's refusal to open DIR (not empty, finished, other settings) has its own advice;
                # "rerun with --resume" fits only errors after it committed its first state.
                raise UserError(msg.message) if opening else _packer_error(msg.message)
            return msg

    def ready(self) -> int:
        """Wait until the writer is open; returns how many inputs it holds already (``--resume`` skips them)."""
        msg = self._reply(opening=True)
        if not isinstance(msg, Ready):
            raise RuntimeError(f"packer protocol: expected Ready, got {msg!r}")
        return msg.done

    def check(self) -> None:
        """Raise if the packer reported an error or died (non-blocking)."""
        with contextlib.suppress(queue.Empty):
            msg = self.outbox.get_nowait()
            if isinstance(msg, PackerError):
                raise _packer_error(msg.message)
        if not self.proc.is_alive():
            raise self._died()

    def _put(self, msg: ToPacker) -> float:
        t0 = time.perf_counter()
        while True:
            try:
                self.inbox.put(msg, timeout=_WAIT_S)
                return time.perf_counter() - t0
            except queue.Full:
                self.check()

    def send(self, batch: CropBatch) -> float:
        """Send ``batch``, blocking while the queue is full (back-pressure); returns the seconds spent waiting."""
        return self._put(Batch(batch))

    def finish(self, extra: dict[str, Any]) -> Done:
        """Finish the dataset (``extra`` goes to ``report.json``); returns the packer's :class:`Done`."""
        # Plain JSON types only: unpickling e.g. torch's TorchVersion (a str subclass) would import torch there.
        self._put(End(json.loads(json.dumps(extra))))
        msg = self._reply()
        if not isinstance(msg, Done):
            raise RuntimeError(f"packer protocol: expected Done, got {msg!r}")
        self.proc.join(timeout=30)
        return msg

    def abort(self) -> Aborted | None:
        """Ask the packer to stop and keep its state resumable; wait for it (briefly).

        Returns its :class:`Aborted` reply; None when it had ended already or gave no reply in time.
        """
        self.stop.set()
        # Batches still buffered for a packer that stopped reading must not block this process's exit.
        self.inbox.cancel_join_thread()
        if not self.proc.is_alive():
            return None
        reply = None
        with contextlib.suppress(Exception):
            self.inbox.put(Abort(), timeout=5)
            msg = self._reply(timeout=60)
            reply = msg if isinstance(msg, Aborted) else None
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()  # it ignores SIGTERM (see packer_main); its state is resumable after any kill
        return reply


# ------------------------------------------------------------------------------------------------ packer process


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def packer_main(
    inbox: Any,
    outbox: Any,
    writer_settings: WriterSettings,
    quality: int,
    save_crops: str | None,
    threads: int,
    parent_pid: int,
    stop: Any = None,
) -> None:
    """Entry point of the packer process (``multiprocessing`` target). See the module docstring for the protocol.

    ``stop``: an optional :class:`StopFlag` (or any object with ``is_set()``); once set, the packer aborts
    (keeping what is committed) at the next input, even with batches still queued.
    """
    # Ctrl-C, a terminal hang-up or a service stop reach the whole process group: the parent decides, this process
    # waits for its Abort (and, should the parent die, notices it within _POLL_S and keeps what is committed).
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    stats = PackerStats()
    try:
        writer = writer_settings.open()
    except (UserError, RecordIOError, OSError) as e:
        outbox.put(PackerError(_describe(e)))
        return
    outbox.put(Ready(writer.done))
    crops_root = Path(save_crops) if save_crops else None
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="encode")
    pending = None  # (batch, its encode futures): encoded while the next batch arrives, then written
    try:
        while True:
            t0 = time.perf_counter()
            try:
                msg: ToPacker = inbox.get(timeout=_POLL_S)
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
            if isinstance(msg, Abort) or (stop is not None and stop.is_set() and isinstance(msg, Batch)):
                raise _Stopped
            if isinstance(msg, End):
                if pending is not None:  # the last batch's crops are encoded: write them
                    _write_batch(writer, *pending, crops_root, stats, stop)
                    pending = None
                extra = dict(msg.extra or {})
                extra["packer"] = {k: round(v, 3) for k, v in vars(stats).items() if k.endswith("_s")}
                extra["packer"]["peak_rss_mb"] = peak_rss_mb()
                t0 = time.perf_counter()
                summary = writer.close(report_extra=extra)
                stats.write_s += time.perf_counter() - t0
                stats.summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(summary).items()}
                outbox.put(Done(vars(stats), writer.report or {}))
                return
            if not isinstance(msg, Batch):
                raise TypeError(f"packer protocol: unexpected message {msg!r}")
            # Encode this batch on the pool while the previous one (encoded already) is written: the disk and the
            # encoder threads overlap instead of taking turns.
            encoding = (msg.batch, _encode_batch(msg.batch, quality, pool))
            if pending is not None:
                _write_batch(writer, *pending, crops_root, stats, stop)
            pending = encoding
    except _Stopped:
        writer.abort()
        outbox.put(Aborted(writer.done))
    except (UserError, RecordIOError, OSError) as e:
        writer.abort()
        outbox.put(PackerError(_describe(e)))
    except BaseException as e:  # a bug: say what it was, keep the dataset resumable
        writer.abort()
        outbox.put(PackerError(f"packer process failed: {type(e).__name__}: {e}"))
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    return str(e)
