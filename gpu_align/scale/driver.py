"""The driver of ``gpu-align run --ray``: scan once, run the shards on Ray actors with retries, merge, report.

Flow: refuse an unusable ``DIR`` → scan (fixes the global order and labels) → join or start Ray → the plan
(``DIR/shards/plan.json``: shard count, torch threads, settings) → one :class:`~gpu_align.scale.worker.ShardWorker`
per GPU or CPU worker → shards handed out in order to idle workers, each a plain resumable ``run`` into
``DIR/shards/<i>`` → when a worker dies (its process killed, its node lost) a new worker takes the shard over from
the shard's own committed state; a shard that fails more than ``retries`` times stops the job naming it → the
finished shards merged in shard order into ``DIR`` (:func:`packer.merge.merge_datasets`) → one ``report.json``.

Why the driver resubmits instead of Ray's ``max_restarts``/``max_task_retries``: a retry must wait until the dead
attempt's packer process has let go of the shard folder, is counted per shard (not per actor) for the "fails
repeatedly" stop, and is reported with its cause; Ray's own retries would do none of that. Actors are created with
``max_restarts=0`` and replaced by the driver.

Why nothing can be lost or written twice: every shard is a dataset written by the existing resumable writer
(commits at identity boundaries, a ``flock`` per folder), and a shard's bytes do not depend on how often it was
interrupted, so retries, ``--resume`` and worker counts never change the merged bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_align.pipeline.options import RunOptions, check_options, check_out_folder
from gpu_align.pipeline.resume import INPUTS_NAME
from gpu_align.pipeline.stages import scan_inputs
from gpu_align.scale.plan import (
    SHARDS_DIR,
    RayOptions,
    plan_shards,
    read_plan,
    shard_dir,
    shard_sources,
    write_plan,
)
from gpu_align.scale.report import merged_report, read_report, write_report
from gpu_align.scale.worker import ShardSpec, ShardWorker
from packer.errors import UserError
from packer.layout import STATE_NAME
from packer.writer.report import read_finished_report

__all__ = ["INSTALL_HINT", "RayRunResult", "ShardFailed", "import_ray", "run_ray"]

INSTALL_HINT = "--ray needs Ray, which is not installed; install it with: pip install \"gpu-align[ray]\""
_COUNTS = ("found", "center", "missed", "failed")
_POLL_S = 0.25  # how often the driver looks at finished shards and at the workers' progress
_START_S = 600.0  # a worker not up after this long, with none alive: the cluster cannot give what is asked
_STOP_WAIT_S = 60.0  # after Ctrl-C, how long running shards get to stop cleanly before their workers are killed


class ShardFailed(UserError):
    """A shard failed more often than allowed, or with an error retrying cannot fix; names the shard."""


@dataclass
class RayRunResult:
    """What a Ray run did (``report`` is the merged ``report.json``)."""

    out_dir: Path
    inputs: int
    images: int
    classes: int
    skipped: int
    processed: int  # inputs aligned by this invocation, all shards together
    shards: int
    workers: int
    retries: int
    seconds: float
    merge_seconds: float
    already_finished: bool = False
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def import_ray():
    """``ray``, or a one-line :class:`UserError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def _check(opts: RunOptions, ray_opts: RayOptions) -> None:
    if opts.shard is not None:
        raise UserError("--shard and --ray exclude each other: --ray cuts the input into --shards N itself")
    if opts.limit is not None:
        raise UserError("--limit is for a quick trial of a plain run; it cannot be combined with --ray")
    if opts.resume and opts.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if ray_opts.shards is not None and ray_opts.shards < 1:
        raise UserError(f"--shards must be at least 1, got {ray_opts.shards}")
    if ray_opts.workers is not None and ray_opts.workers < 1:
        raise UserError(f"--workers must be at least 1, got {ray_opts.workers}")
    if ray_opts.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {ray_opts.retries}")


def _finished_ray_report(out: Path) -> dict[str, Any] | None:
    """The merged report of a Ray run that completed in ``out`` (None when it did not)."""
    if (out / STATE_NAME).exists():
        return None
    report = read_finished_report(out)
    return report if report is not None and "ray" in (report.get("extra") or {}) else None


def _unfinished_command(out: Path) -> str | None:
    """The command whose unfinished pack ``out`` holds (``"merge"`` for a Ray run's merge), None without one."""
    try:
        return str(json.loads((out / STATE_NAME).read_bytes())["config"]["input"]["command"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: the merge's writer says what it is
        return None


def _prepare_out(out: Path, opts: RunOptions) -> dict[str, Any] | None:
    """Refuse a ``DIR`` that is not this run's to write; ``--overwrite`` clears gpu-align's files and shards.

    Returns the finished report when ``--resume`` finds the job complete.
    """
    if not out.exists() or not any(out.iterdir()):
        return None
    plan = (out / SHARDS_DIR).is_dir() and read_plan(out) is not None
    finished = _finished_ray_report(out)
    other = _unfinished_command(out)
    if opts.resume and other not in (None, "merge"):  # an interrupted plain run: its merge could never resume
        raise UserError(
            f"{out} holds an unfinished `gpu-align {other}` without --ray: continue it with that command and "
            "--resume (no --ray), or use --overwrite to start a Ray run there"
        )
    if opts.overwrite:
        if (out / SHARDS_DIR).is_dir() and not plan:
            raise UserError(f"{out / SHARDS_DIR} was not written by gpu-align --ray; move it away first")
        if plan:
            shutil.rmtree(out / SHARDS_DIR)
        (out / INPUTS_NAME).unlink(missing_ok=True)  # a plain run's resume sidecar: no merge writes or removes it
        return None  # the merge's writer removes its own files (overwrite=True)
    if opts.resume:
        if finished is not None:
            return finished
        if plan or (out / STATE_NAME).exists():
            return None
        raise UserError(f"{out} holds no Ray run to resume; choose another folder, or use --overwrite")
    if finished is not None:
        raise UserError(
            f"{out} already holds a finished dataset ({finished['counts']['images']} images); use --overwrite to "
            "rebuild it, or choose another folder"
        )
    if plan:
        raise UserError(
            f"{out} holds an unfinished Ray run: add --resume to continue it, or --overwrite to start again"
        )
    raise UserError(
        f"{out} is not empty; choose a new or empty folder, or use --overwrite to replace gpu-align's files"
    )


def _plan_settings(opts: RunOptions) -> dict[str, Any]:
    """The settings a shard's bytes depend on; a ``--resume`` with others is refused up front (the shards' own
    writers would refuse them too, but one shard at a time)."""
    skip = {
        "src", "out", "resume", "overwrite", "quiet", "threads", "queue_batches", "packer_threads", "report_html",
        "limit", "shard",
    }
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in skip}


def _connect(ray, address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address in (None, "local"):
        ray.init(**kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray {address}: cannot join that Ray cluster ({e})") from None
    return True


@dataclass
class _Worker:
    name: str
    actor: Any
    info: dict[str, Any]
    shards: int = 0
    alive: bool = True


@dataclass
class _Attempt:
    spec: ShardSpec
    worker: _Worker
    started: float


class _Scheduler:
    """Hands shards to idle workers in order, replaces dead workers, retries shards, feeds the progress bar."""

    def __init__(
        self,
        ray,
        specs: list[ShardSpec],
        n_workers: int,
        actor_options: dict[str, Any],
        worker_args: tuple,
        retries: int,
        bar,
        on_status: Callable[[dict[str, Any]], None] | None,
    ):
        self.ray = ray
        self.cls = ray.remote(ShardWorker)
        self.actor_options = actor_options
        self.worker_args = worker_args
        self.pending: deque[ShardSpec] = deque(specs)
        self.total = {s.index: len(s.source.items) for s in specs}
        self.done = dict.fromkeys(self.total, 0)
        self.counts: dict[int, dict[str, int]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.failures: dict[int, int] = dict.fromkeys(self.total, 0)
        self.retries: list[dict[str, Any]] = []
        self.max_retries = retries
        self.workers: list[_Worker] = []
        self.inflight: dict[Any, _Attempt] = {}
        self.starting: dict[Any, tuple[Any, float]] = {}  # a replacement worker's info() ref -> (actor, when asked)
        self.bar = bar
        self.on_status = on_status
        self.status: dict[int, dict[str, Any]] = {}
        self._n_created = 0
        self._start_workers(min(n_workers, len(specs)))

    # -------------------------------------------------------------------------------------------- workers

    def _start_workers(self, n: int) -> None:
        """Start ``n`` workers and wait until each is up (the job's first workers)."""
        for _ in range(n):
            self._replace_worker()
        deadline = time.monotonic() + _START_S
        while self.starting and (left := deadline - time.monotonic()) > 0:
            self._check_starting(wait_s=left)
        self._check_starting()  # none up by now: refused; some: the job starts with them, the rest may follow

    def _replace_worker(self) -> None:
        """Ask for one more worker without waiting for it: the others go on with their shards meanwhile (on a
        cluster that lost a node for good, the job finishes on the survivors)."""
        actor = self.cls.options(**self.actor_options).remote(*self.worker_args)
        self.starting[actor.info.remote()] = (actor, time.monotonic())

    def _worker_up(self, ref) -> None:
        actor, _ = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            return  # it died while starting; what needs a worker asks for another
        self.workers.append(_Worker(f"w{self._n_created}", actor, info))
        self._n_created += 1

    def _check_starting(self, wait_s: float = 0.0) -> None:
        """Take in the workers that are up; refuse to wait longer than :data:`_START_S` when no worker is alive
        (the cluster lacks the resources asked for)."""
        if not self.starting:
            return
        ready, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=wait_s)
        for ref in ready:
            self._worker_up(ref)
        now = time.monotonic()
        stuck = [ref for ref, (_, t0) in self.starting.items() if now - t0 > _START_S]
        if stuck and not any(w.alive for w in self.workers):
            raise UserError(
                f"a Ray worker did not start within {_START_S / 60:.0f} minutes: the cluster lacks the resources "
                f"asked for ({self.actor_options}); see --workers/--ray"
            )

    def _for_worker(self, spec: ShardSpec, w: _Worker) -> ShardSpec:
        """``spec`` with ``w``'s share of its node's cores: the packer's JPEG threads (half of it, at most 8, as a
        plain run takes half the machine) and, on a GPU, its decode and torch threads. Eight workers on a node
        each taking a plain run's share would run 8x too many threads. None of these change the bytes."""
        node = w.info.get("node")
        on_node = sum(x.alive and x.info.get("node") == node for x in self.workers)
        share = max(1, int(w.info.get("cores") or 1) // max(1, on_node))
        changes: dict[str, Any] = {"packer_threads": min(8, max(1, share // 2))}
        if spec.gpu and spec.opts.threads is None:
            changes["threads"] = share
        return dataclasses.replace(spec, opts=dataclasses.replace(spec.opts, **changes), cpu_share=share)

    def _idle(self) -> list[_Worker]:
        busy = {id(a.worker) for a in self.inflight.values()}
        return [w for w in self.workers if w.alive and id(w) not in busy]

    # -------------------------------------------------------------------------------------------- the loop

    def run(self) -> dict[int, dict[str, Any]]:
        last_poll = 0.0
        while self.pending or self.inflight:
            for w in self._idle():
                if not self.pending:
                    break
                spec = self.pending.popleft()
                w.shards += 1
                self.inflight[w.actor.run_shard.remote(self._for_worker(spec, w))] = _Attempt(spec, w, time.time())
            if self.pending and not self.starting and not any(w.alive for w in self.workers):
                self._replace_worker()  # every worker is gone (e.g. one died while starting): ask again
            if self.inflight:
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=_POLL_S)
                for ref in ready:
                    self._finished(ref)
            self._check_starting(wait_s=0.0 if self.inflight else _POLL_S)
            if time.monotonic() - last_poll >= _POLL_S:
                self._poll()
                last_poll = time.monotonic()
        self._poll()
        return self.results

    def _finished(self, ref) -> None:
        att = self.inflight.pop(ref)
        spec, w = att.spec, att.worker
        try:
            res = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            w.alive = False
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._retry(spec, w, f"worker {w.name} (pid {w.info.get('pid')}, {w.info.get('host')}) died: {why}")
            self._replace_worker()
            return
        except self.ray.exceptions.RayError as e:
            self._retry(spec, w, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return
        if "error" in res:
            if res.get("user_error"):  # the same again on every attempt (a setting, a folder): stop now
                self._fail(spec, res["error"], attempts=spec.attempt + 1)
            self._retry(spec, w, res["error"])
            return
        if res.get("stopped"):  # only a stop() asks for it, and stop() reads no results: never merge a part
            self._retry(spec, w, "the shard stopped before its end (interrupted in its worker)")
            return
        res["worker"] = w.name
        res["attempts"] = spec.attempt + 1
        self.results[spec.index] = res
        self.done[spec.index] = res["inputs"]
        self.counts[spec.index] = {k: res[k] for k in ("found", "center", "missed", "failed")}
        self.status.pop(spec.index, None)

    def _retry(self, spec: ShardSpec, w: _Worker, why: str) -> None:
        self.failures[spec.index] += 1
        self.retries.append({"shard": spec.index, "attempt": spec.attempt + 1, "worker": w.name, "error": why})
        if self.failures[spec.index] > self.max_retries:
            self._fail(spec, why, attempts=spec.attempt + 1)
        self.pending.appendleft(dataclasses.replace(spec, attempt=spec.attempt + 1))

    def _fail(self, spec: ShardSpec, why: str, attempts: int) -> None:
        times = f" after {attempts} attempts" if attempts > 1 else ""
        raise ShardFailed(
            f"shard {spec.index} of {spec.count} ({spec.opts.out}) failed{times}: {why}; every shard keeps what it "
            "committed: fix the cause, then rerun with --resume"
        )

    def _poll(self) -> None:
        """Each busy worker's progress: the bar, and the ``on_status`` snapshot."""
        busy = {a.worker.name: a for a in self.inflight.values()}
        refs = {a.worker.actor.status.remote(): a for a in busy.values()}
        if refs:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=2.0)
            for ref in ready:
                with contextlib.suppress(self.ray.exceptions.RayError):
                    st = self.ray.get(ref)
                    att = refs[ref]
                    if st.get("shard") == att.spec.index:
                        self.done[att.spec.index] = max(self.done[att.spec.index], int(st.get("done", 0)))
                        self.counts[att.spec.index] = st.get("counts") or {}
                        self.status[att.spec.index] = {
                            **st,
                            "worker": att.worker.name,
                            "pid": att.worker.info.get("pid"),
                        }
        if self.bar is not None:
            self.bar.n = sum(self.done.values())
            totals = {k: sum(c.get(k, 0) for c in self.counts.values()) for k in _COUNTS}
            self.bar.set_postfix(
                faces=totals["found"] + totals["center"],
                missed=totals["missed"],
                bad=totals["failed"],
                workers=sum(w.alive for w in self.workers),
                shards=f"{len(self.results)}/{len(self.total)}",
                **({"retries": len(self.retries)} if self.retries else {}),
                refresh=False,
            )
            self.bar.refresh()
        if self.on_status is not None:
            self.on_status(
                {
                    "shards": {k: dict(v) for k, v in self.status.items()},
                    "finished": sorted(self.results),
                    "workers_alive": sum(w.alive for w in self.workers),
                    "retries": list(self.retries),
                }
            )

    # -------------------------------------------------------------------------------------------- stopping

    def stop(self) -> None:
        """Ctrl-C or a failed shard: running shards stop at their next batch (resumable), then the workers end.

        A second Ctrl-C while waiting kills the workers at once; their packers still keep what is committed.
        """
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(Exception):
                    w.actor.stop.remote()
        try:
            if self.inflight:
                self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=_STOP_WAIT_S)
        finally:
            self.close()

    def close(self) -> None:
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(Exception):
                    self.ray.kill(w.actor, no_restart=True)
                w.alive = False
        for actor, _ in self.starting.values():  # replacements still starting
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.starting.clear()

    def worker_report(self) -> list[dict[str, Any]]:
        per: dict[str, dict[str, Any]] = {
            w.name: {
                "worker": w.name, **w.info, "alive_at_end": w.alive, "shards": 0, "processed": 0, "busy_s": 0.0,
                "cpu_s": 0.0,
            }
            for w in self.workers
        }
        for res in self.results.values():
            if "worker" in res:
                p = per[res["worker"]]
                p["shards"] += 1
                p["processed"] += res.get("processed", 0)
                p["busy_s"] += res.get("seconds", 0.0)
                p["cpu_s"] += res.get("cpu_seconds", 0.0)
        for p in per.values():
            p["busy_s"], p["cpu_s"] = round(p["busy_s"], 3), round(p["cpu_s"], 3)
            p["images_per_second"] = round(p["processed"] / p["busy_s"], 1) if p["busy_s"] > 0 else None
        return list(per.values())


def _progress_bar(opts: RunOptions, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", desc="aligning (ray)", disable=opts.quiet, dynamic_ncols=True, smoothing=0.1,
        file=sys.stderr,
    )


def _resources(ray, opts: RunOptions, ray_opts: RayOptions, local: bool) -> tuple[bool, int, dict[str, Any]]:
    """GPU or CPU workers, how many, and each one's Ray resources."""
    cluster = ray.cluster_resources()
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    if opts.device.startswith("cuda") and gpus < 1:
        raise UserError(f"--device {opts.device} with --ray: the Ray cluster has no GPU")
    gpu = opts.device != "cpu" and gpus >= 1
    per_cpu = ray_opts.worker_cpus if ray_opts.worker_cpus is not None else 1.0
    per_gpu = (ray_opts.worker_gpus if ray_opts.worker_gpus is not None else 1.0) if gpu else 0.0
    workers = ray_opts.workers or (max(1, int(gpus // per_gpu)) if gpu else 1)
    if local and workers * per_cpu > cpus + 1e-9:
        raise UserError(
            f"{workers} workers × {per_cpu:g} CPUs need more than this machine's {cpus:g} Ray CPUs; use fewer --workers"
        )
    if local and gpu and workers * per_gpu > gpus + 1e-9:
        raise UserError(f"{workers} GPU workers need more than this machine's {gpus:g} GPUs; use fewer --workers")
    resources: dict[str, Any] = {"num_cpus": per_cpu, "max_restarts": 0, "max_concurrency": 2}
    if gpu:
        resources["num_gpus"] = per_gpu
    return gpu, workers, resources


def run_ray(
    opts: RunOptions, ray_opts: RayOptions, *, on_status: Callable[[dict[str, Any]], None] | None = None
) -> RayRunResult:
    """``gpu-align run --ray``: the whole job on Ray; returns what it did. See the module docstring.

    ``on_status`` gets a snapshot of the job (each running shard's progress, its worker's pid, ``held``) about
    four times a second; a KeyboardInterrupt raised in it stops the job as Ctrl-C does (a test's way to stop at a
    known point). Raises :class:`UserError` (:class:`ShardFailed` for a shard that kept failing); on Ctrl-C the
    running shards stop cleanly and KeyboardInterrupt is re-raised: ``--resume`` continues.
    """
    ray = import_ray()
    t_start = time.perf_counter()
    _check(opts, ray_opts)
    check_out_folder(opts.out, "--out")
    out = Path(opts.out)
    finished = _prepare_out(out, opts)
    if finished is not None:
        return _result(out, finished, t_start)
    source = scan_inputs(opts)  # the whole input (_check refused --shard and --limit)
    if not opts.quiet:
        for m in source.csv:  # how --landmarks-csv / --boxes-csv met the photos, as a plain run says it
            print(f"gpu-align: {m.summary()}", file=sys.stderr)
    started = _connect(ray, ray_opts.address)
    sched: _Scheduler | None = None
    try:
        import torch

        gpu, n_workers, actor_options = _resources(ray, opts, ray_opts, started and ray_opts.address in (None, "local"))
        run_opts = dataclasses.replace(opts, device="cuda" if gpu else "cpu")
        check_options(run_opts, torch.device(run_opts.device))  # fills the batch size; refuses bad values now
        old = read_plan(out)
        threads = None if gpu else (ray_opts.torch_threads or torch.get_num_threads())
        identities = len({it.group for it in source.items})
        n = plan_shards(ray_opts.shards, len(source.items), identities, int(old["shards"]) if old else None, out)
        settings = _plan_settings(run_opts)
        if old is not None:
            if old.get("settings") != settings:
                diffs = [
                    f"{k}: {old['settings'].get(k)!r} then, {v!r} now"
                    for k, v in settings.items()
                    if old.get("settings", {}).get(k) != v
                ]
                raise UserError(
                    f"{out} was started with other settings ({'; '.join(diffs)}); rerun with the same ones, or use "
                    "--overwrite to start again"
                )
            threads = old.get("torch_threads")
        write_plan(
            out,
            {"source": source.root, "inputs": len(source.items), "shards": n, "torch_threads": threads,
             "settings": settings},
        )
        parts = shard_sources(source, n)
        specs = []
        for i, part in enumerate(parts):
            if not part.items:
                continue
            shard_opts = dataclasses.replace(
                run_opts, out=str(shard_dir(out.absolute(), i, n)), shard=(i, n), resume=True, overwrite=False,
                quiet=True, layout="insightface", shuffle=None, report_html=False,  # DIR gets the one report.html
                # absolute: a worker on another node runs in the directory its `ray start` ran in, not the driver's
                save_crops=os.path.abspath(run_opts.save_crops) if run_opts.save_crops else None,
            )
            hold = ray_opts.hold[1] if ray_opts.hold and ray_opts.hold[0] == i else None
            specs.append(ShardSpec(i, n, shard_opts, part, hold=hold, gpu=gpu))
        with _progress_bar(opts, len(source.items)) as bar:
            sched = _Scheduler(
                ray, specs, n_workers, actor_options, (threads, gpu), ray_opts.retries, bar, on_status
            )
            try:
                results = sched.run()
            except BaseException:
                sched.stop()
                raise
            sched.close()
        t_merge = time.perf_counter()
        report = _merge(out, opts, specs, results, source, sched, ray_opts, run_opts, gpu, threads, t_start)
        merge_seconds = time.perf_counter() - t_merge
    finally:
        if started:
            ray.shutdown()
    from packer.report_html import write_report_html_or_warn

    write_report_html_or_warn(out)
    if not ray_opts.keep_shards:
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    return _result(
        out,
        report,
        t_start,
        processed=sum(r.get("processed", 0) for r in results.values()),
        shards=len(specs),
        workers=sched._n_created if sched else 0,
        retries=len(sched.retries) if sched else 0,
        merge_seconds=round(merge_seconds, 3),
    )


def _merge(
    out: Path,
    opts: RunOptions,
    specs: list[ShardSpec],
    results: dict[int, dict[str, Any]],
    source,
    sched: _Scheduler,
    ray_opts: RayOptions,
    run_opts: RunOptions,
    gpu: bool,
    threads: int | None,
    t_start: float,
) -> dict[str, Any]:
    """Merge the shards in order into ``out`` and write the merged report."""
    from packer.merge import merge_datasets

    dirs = [s.opts.out for s in specs]
    t0 = time.perf_counter()
    resume = (out / STATE_NAME).exists() and not opts.overwrite  # --overwrite: whatever is there is replaced
    merge_datasets(
        dirs,
        out,
        layout=opts.layout,
        label_style=opts.label_style,
        shuffle_seed=opts.shuffle,
        resume=resume,
        overwrite=not resume,
        progress=not opts.quiet,
    )
    merge_s = time.perf_counter() - t0
    shard_reports = [read_report(d) for d in dirs]
    seconds = round(time.perf_counter() - t_start, 3)
    processed = sum(r.get("processed", 0) for r in results.values())
    totals = {k: sum(r.get(k, 0) for r in results.values()) for k in ("found", "center", "missed", "failed")}
    run = {
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "quiet"},
        "device": ", ".join(sorted({str(r.get("device")) for r in results.values() if r.get("device")})) or None,
        "this_invocation": {
            "processed": processed,
            **totals,
            "seconds": seconds,
            "images_per_second": round(processed / seconds, 1) if seconds > 0 else None,
            "merge_seconds": round(merge_s, 3),
        },
    }
    ray_info = {
        "address": ray_opts.address or "local",
        "workers": sched.worker_report(),
        "worker_resources": {k: v for k, v in sched.actor_options.items() if k.startswith("num_")},
        "gpu": gpu,
        "torch_threads": threads,
        "plan": {"shards": specs[0].count if specs else 0, "batch_size": run_opts.batch_size},
        "shards": [
            {
                "shard": s.index,
                "dir": str(Path(s.opts.out).relative_to(out.absolute())),
                **{k: v for k, v in results[s.index].items() if k not in ("shard", "out", "stage_seconds")},
            }
            for s in specs
        ],
        "retries": sched.retries,
        "shards_kept": ray_opts.keep_shards,
    }
    report = merged_report(read_report(out), shard_reports, source=source, run=run, ray=ray_info)
    write_report(out, report)
    return report


def _result(out: Path, report: dict[str, Any], t_start: float, **did: Any) -> RayRunResult:
    """The result of a run that wrote the merged ``report``; without ``did`` (processed, shards, workers,
    retries, merge_seconds), of a ``--resume`` that found the job already finished."""
    counts = report["counts"]
    if not did:
        did = dict(processed=0, shards=len(report["extra"]["ray"].get("shards", [])), workers=0, retries=0,
                   merge_seconds=0.0, already_finished=True)
    return RayRunResult(
        out_dir=out,
        inputs=counts["inputs"],
        images=counts["images"],
        classes=counts["classes"],
        skipped=counts["skipped"],
        seconds=round(time.perf_counter() - t_start, 3),
        report=report,
        **did,
    )
