"""Scale-out of ``gpu-align run`` on Ray: one job over every GPU of a machine or a cluster (``run --ray``).

The driver scans once, cuts the inputs into shards exactly as ``--shard i/n`` does (contiguous identity blocks),
runs each shard as an ordinary resumable ``run`` inside a long-lived Ray actor (one per GPU, or ``--workers N`` on
CPUs), retries a shard from its own resume state when its worker dies, and merges the finished shards in order with
:func:`packer.merge.merge_datasets`. The merged bytes equal ``run --shard i/n`` for every i, then ``merge``.

Modules: :mod:`.plan` (options, the shard plan; no Ray, no torch), :mod:`.worker` (the actor), :mod:`.driver`
(scheduling, retries, progress, merge), :mod:`.report` (the merged ``report.json``), :mod:`.cli` (the flags).
Ray is imported only when a Ray run starts (``pip install "gpu-align[ray]"``).
"""

from gpu_align.scale.plan import RayOptions

__all__ = ["RayOptions", "run_ray"]


def run_ray(*args, **kwargs):
    """:func:`gpu_align.scale.driver.run_ray` (imported on first use: the driver needs torch and Ray)."""
    from gpu_align.scale.driver import run_ray as _run_ray

    return _run_ray(*args, **kwargs)
