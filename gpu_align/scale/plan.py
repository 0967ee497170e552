"""The shard plan of a Ray run: its options, how the one scan is cut into shards, and ``DIR/shards/plan.json``.

Why the cut is ``--shard i/n``'s own: the merged output must be byte-identical to running ``gpu-align run --shard
i/n`` for every i and then ``gpu-align merge``, so every shard must hold exactly the inputs that command would
scan, with the same indices (batches are cut at multiples of the batch size of the shard's list). The driver scans
once and cuts the list with :func:`gpu_align.scan.shard_blocks`, the function ``--shard`` uses, instead of every
worker scanning the whole tree again (3.1 M ``stat``-less directory entries per shard for VGGFace2).

Why the default shard count depends on the input size only (never on the worker count): a photo's batch, hence its
detection, depends on where its shard starts, so a default tied to the workers would change the bytes when a rerun
gets another number of GPUs. ``plan.json`` fixes the count (and the torch thread count of CPU workers, which also
changes float rounding) for every later ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_align.scan import Source, shard_blocks
from packer.errors import UserError
from packer.fsutil import atomic_write

__all__ = [
    "DEFAULT_SHARD_PHOTOS",
    "PLAN_NAME",
    "SHARDS_DIR",
    "RayOptions",
    "default_shards",
    "plan_shards",
    "read_plan",
    "shard_dir",
    "shard_sources",
    "write_plan",
]

SHARDS_DIR = "shards"  # DIR/shards/<i>: one resumable dataset per shard, on storage every node sees
PLAN_NAME = "plan.json"  # DIR/shards/plan.json
_PLAN_FORMAT = "gpu-align ray plan"
# ~10 s of one GPU at ~2,000 photos/s and ~4 min of one 2-core CPU worker: long enough that a shard's fixed cost
# (packer process, models, decoder: ~1 s) stays small, short enough that a retry redoes little and 64 GPUs still
# get a few shards each on VGGFace2 (3.1 M photos -> 156 shards).
DEFAULT_SHARD_PHOTOS = 20_000


@dataclass
class RayOptions:
    """How a Ray run is spread (``gpu-align run --ray``'s flags); what it computes is :class:`RunOptions`'.

    Attributes:
        address: None or ``"local"``: start a Ray runtime on this machine (or use the one this process already
            joined); ``"auto"`` or ``host:port``: join that cluster (``ray start --head`` printed it).
        shards: how many shards (contiguous identity blocks); None: one per :data:`DEFAULT_SHARD_PHOTOS` photos.
            Fixed by the first run of ``DIR`` (a ``--resume`` keeps it). The bytes depend on it, not on workers.
        workers: how many actors; None: one per GPU of the cluster, or 1 CPU worker without GPUs.
        worker_cpus: Ray CPUs each worker reserves (default 1; fractions let tests share 2 cores).
        worker_gpus: Ray GPUs each GPU worker reserves (default 1).
        retries: how often one shard may fail (its worker died, an error) before the job stops naming it.
        keep_shards: keep ``DIR/shards`` after the merge (default: removed, the merged copy holds every byte).
        torch_threads: torch's intra-op threads in CPU workers; None: this process's ``torch.get_num_threads()``,
            what a plain ``gpu-align run`` here uses. CPU float rounding depends on it (a landmark can move by
            0.01 px), so it is part of the plan, like ``shards``.
        hold: test hook ``(shard, n)``: on the shard's first attempt, once ``n`` inputs were sent and the writer has
            committed some, the worker stops working and reports ``held`` (so a test can kill it at a known point).
    """

    address: str | None = None
    shards: int | None = None
    workers: int | None = None
    worker_cpus: float | None = None
    worker_gpus: float | None = None
    retries: int = 2
    keep_shards: bool = False
    torch_threads: int | None = None
    hold: tuple[int, int] | None = None


def default_shards(num_inputs: int) -> int:
    """One shard per :data:`DEFAULT_SHARD_PHOTOS` photos (at least one)."""
    return max(1, math.ceil(num_inputs / DEFAULT_SHARD_PHOTOS))


def plan_shards(requested: int | None, num_inputs: int, identities: int, planned: int | None, out) -> int:
    """The shard count: ``--shards`` (``requested``) or :func:`default_shards`, at most one per identity (more
    would only add empty shards); a resumed job's ``planned`` count wins, and a ``requested`` one that differs from
    it is refused. The clamp applies before the comparison, so rerunning the same command with ``--resume``
    (what a stopped job prints) is accepted."""
    n = max(1, min(requested or default_shards(num_inputs), identities))
    if planned is None:
        return n
    if requested is not None and n != planned:
        raise UserError(f"{out} was started with --shards {planned}; resume it with that (or omit it)")
    return int(planned)


def shard_sources(source: Source, n: int) -> list[Source]:
    """The ``n`` shards of an unsharded, unlimited scan: shard i equals ``scan_source(src, shard=(i, n))``.

    Same identities per block (:func:`gpu_align.scan.shard_blocks`, what ``scan_source`` cuts with), same order,
    indices renumbered from 0; the scan's skipped files (and ``--landmarks-csv`` matches) stay with every shard, as
    ``--shard`` keeps them. ``tests/test_ray.py`` checks the equality against ``scan_source`` itself. An empty
    shard (possible when one identity holds more than 1/n of the photos) is an empty list: ``--shard i/n`` refuses
    it, a Ray run leaves it out.
    """
    return [
        dataclasses.replace(
            source, items=[dataclasses.replace(it, index=k) for k, it in enumerate(block)], skipped=list(source.skipped)
        )
        for block in shard_blocks(source.items, n)
    ]


def shard_dir(out: str | os.PathLike, i: int, n: int) -> Path:
    """``DIR/shards/<i>``, zero-padded to the width of ``n - 1`` so that a listing sorts in shard order."""
    return Path(out) / SHARDS_DIR / f"{i:0{len(str(max(0, n - 1)))}d}"


def read_plan(out: str | os.PathLike) -> dict[str, Any] | None:
    """``DIR/shards/plan.json`` of an earlier Ray run, or None when there is none."""
    path = Path(out) / SHARDS_DIR / PLAN_NAME
    try:
        plan = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); rerun with --overwrite to start again") from None
    if not isinstance(plan, dict) or plan.get("format") != _PLAN_FORMAT:
        raise UserError(f"{path} is not a gpu-align Ray plan; rerun with --overwrite to start again")
    return plan


def write_plan(out: str | os.PathLike, plan: dict[str, Any]) -> None:
    """Write the plan atomically (fsynced): a ``--resume`` must find what the shards were written with."""
    path = Path(out) / SHARDS_DIR / PLAN_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"format": _PLAN_FORMAT, "version": 1, **plan}, indent=1) + "\n").encode())
