"""The Ray actor of a scale-out run: one long-lived process per GPU (or CPU worker) that runs shard after shard.

Why an actor and not a task per shard: the process stays warm. Importing torch and the pipeline (~1.2 s), CUDA's
context and cuDNN's autotuning are paid once per worker, not once per shard; the models themselves are rebuilt per
shard because that costs ~30 ms (:class:`~gpu_align.align.FaceAligner` on CPU) and keeps every shard exactly a
plain ``run``.

Why a threaded actor (``max_concurrency=2``): :meth:`ShardWorker.run_shard` blocks for the whole shard, and the
driver still needs :meth:`status` (its progress bar) and :meth:`stop` (Ctrl-C) meanwhile. Ray cannot interrupt a
running method of a synchronous actor (``ray.cancel`` only marks it), so stopping goes through an event that the
run's per-batch progress callback checks: it raises KeyboardInterrupt inside ``run``, which stops the packer at its
next input and keeps everything committed, exactly like Ctrl-C on a plain run.

This module never imports Ray: the driver wraps the class with ``ray.remote`` at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_align.scan import Source

_LOCK_WAIT_S = 60.0  # how long a retry waits for the dead attempt's packer to let go of the shard's folder


@dataclass
class ShardSpec:
    """One shard to run: ``opts`` is a plain run's (``shard=(i, n)``, ``out=DIR/shards/<i>``, ``resume=True``)."""

    index: int
    count: int
    opts: Any  # RunOptions (typed loosely: this module must import without torch)
    source: Source
    attempt: int = 0
    hold: int | None = None  # test hook: see RayOptions.hold
    gpu: bool = False
    cpu_share: int | None = None  # this worker's share of its node's cores (the driver sets it when it hands out)


def _cpu_seconds() -> float:
    """User + system CPU of this worker process and of its reaped children (each shard's packer process)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cores() -> int:
    """The cores this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _committed(out: Path) -> int:
    """Inputs the shard's writer has committed (its ``pack.state.json``), 0 when there is none yet."""
    from packer.layout import STATE_NAME

    try:
        return int(json.loads((out / STATE_NAME).read_bytes()).get("done", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _wait_for_folder(out: Path, timeout: float | None = None) -> bool:
    """Wait until no process holds the writer's ``flock`` on ``out``; False when one still does after ``timeout``
    seconds (default :data:`_LOCK_WAIT_S`).

    After an actor is killed its packer process notices within a second, aborts and releases the lock; a retry
    that started at once would be refused ("being written by another gpu-align process").
    """
    try:
        import fcntl
    except ImportError:
        return True
    if not out.is_dir():
        return True
    deadline = time.monotonic() + (_LOCK_WAIT_S if timeout is None else timeout)
    while True:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # free (closing the descriptor below releases it again)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
        finally:
            os.close(fd)
        time.sleep(0.1)


class ShardWorker:
    """Runs shards one after another (:meth:`run_shard`) and answers :meth:`status` / :meth:`stop` meanwhile."""

    def __init__(self, torch_threads: int | None, gpu: bool):
        # Before torch loads in this process: idle OpenMP threads sleep instead of spinning (what the gpu-align
        # command sets, see gpu_align.cli.cpu_defaults); several workers share a machine's cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        import gpu_align.pipeline  # noqa: F401  (the warm part: torch, the models' code, the decoders)

        if torch_threads:  # CPU workers: the plan's count (float rounding depends on it); GPU ones: per shard
            torch.set_num_threads(int(torch_threads))
        self.torch_threads = torch.get_num_threads()
        self.gpu = gpu
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._busy_s = 0.0
        self._processed = 0

    def info(self) -> dict[str, Any]:
        """Where this worker runs: pid (what a test kills), host, Ray node, device, threads."""
        import torch

        node = None
        with contextlib.suppress(Exception):
            import ray

            node = ray.get_runtime_context().get_node_id()
        device = "cpu"
        if self.gpu and torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            device = f"cuda ({torch.cuda.get_device_name(0)}; CUDA_VISIBLE_DEVICES={visible})"
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": node,
            "device": device,
            "torch_threads": self.torch_threads,
            "cores": _cores(),
        }

    def status(self) -> dict[str, Any]:
        """The running shard's progress (``{}`` between shards), and this worker's totals."""
        with self._lock:
            return {**self._status, "busy_s": self._busy_s, "processed_total": self._processed}

    def stop(self) -> None:
        """Ask the running shard to stop at its next batch (kept resumable); later shards are refused."""
        self._stop.set()

    def run_shard(self, spec: ShardSpec) -> dict[str, Any]:
        """Run one shard as a plain resumable ``run``; returns what it did, or ``{"error": ...}``.

        Errors come back as values rather than exceptions so that the driver sees one message line and whether
        it is the user's to fix (:class:`UserError`), whatever Ray does with exception types across processes.
        A killed process is the driver's to notice (the call fails with an actor error).
        """
        from gpu_align.pipeline import PackerDied, run
        from packer.errors import UserError

        out = Path(spec.opts.out)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        with self._lock:
            self._status = {"shard": spec.index, "attempt": spec.attempt, "done": 0, "total": len(spec.source.items),
                            "counts": {}, "held": False, "resumed_at": 0, "started": time.time()}
        if self._stop.is_set():
            return {"shard": spec.index, "stopped": True, "done": _committed(out)}
        first = True
        opened = time.monotonic()
        waited = False

        def progress(done: int, total: int, counts: dict[str, int]) -> None:
            nonlocal first, opened
            with self._lock:
                if first:  # the first call comes when the writer opened: ``done`` = what earlier attempts committed
                    self._status["resumed_at"] = done
                    opened, first = time.monotonic(), False
                self._status.update(done=done, total=total, counts=counts)
            if self._stop.is_set():
                raise KeyboardInterrupt
            if spec.hold is not None and spec.attempt == 0 and done >= spec.hold:
                hold()

        def hold() -> None:
            """Test hook (RayOptions.hold): stop working once the writer has committed part of the shard.

            The writer commits at the first identity boundary it writes after its commit interval (1 s) since
            opening: so wait that long once, let the next batches cross a boundary, then wait for the commit.
            """
            nonlocal waited
            if _committed(out) == 0:
                if not waited:
                    time.sleep(max(0.0, opened + 1.2 - time.monotonic()))
                    waited = True
                    return
                deadline = time.monotonic() + 5  # the packer writes what it holds within ~1 s
                while _committed(out) == 0 and time.monotonic() < deadline and not self._stop.is_set():
                    time.sleep(0.02)
                if _committed(out) == 0:
                    return  # try again after the next batch
            with self._lock:
                self._status["held"] = True
            self._stop.wait()  # until killed (the test) or stopped (Ctrl-C)
            raise KeyboardInterrupt

        if self.gpu and spec.cpu_share:  # torch's CPU threads do little on the GPU path: this worker's share
            import torch

            torch.set_num_threads(spec.cpu_share)
            self.torch_threads = spec.cpu_share
        try:
            if not _wait_for_folder(out):  # the writer would refuse as a user's error: a retry may find it free
                raise RuntimeError(
                    f"{out} is still locked {_LOCK_WAIT_S:g} s after this attempt began (the previous attempt's "
                    "packer, or another gpu-align process, still writes it)"
                )
            result = run(spec.opts, source=spec.source, progress=progress)
        except KeyboardInterrupt:
            return {"shard": spec.index, "stopped": True, "done": _committed(out)}
        except (UserError, PackerDied) as e:
            return {"shard": spec.index, "error": str(e), "user_error": isinstance(e, UserError)}
        except Exception as e:  # a bug or the environment (a full disk is an OSError): say what, let the driver retry
            tb = traceback.format_exc(limit=-3)
            return {"shard": spec.index, "error": f"{type(e).__name__}: {e}", "user_error": False, "traceback": tb}
        finally:
            seconds = time.perf_counter() - t0
            with self._lock:
                self._busy_s += seconds
                self._processed += self._status.get("done", 0) - self._status.get("resumed_at", 0)
                self._status = {}
        report = result.report
        inv = report.get("extra", {}).get("run", {}).get("this_invocation", {})
        return {
            "shard": spec.index,
            "out": str(out),
            "inputs": result.inputs,
            "processed": result.processed,
            "resumed_at": inv.get("resumed_at", 0),
            "found": result.found,
            "center": result.center,
            "missed": result.missed,
            "failed": result.failed,
            "images": report.get("counts", {}).get("images"),
            "classes": report.get("counts", {}).get("classes"),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(_cpu_seconds() - cpu0, 3),
            "images_per_second": round(result.processed / seconds, 1) if seconds > 0 else None,
            "stage_seconds": inv.get("stage_seconds"),
            "device": report.get("extra", {}).get("run", {}).get("device"),
        }
