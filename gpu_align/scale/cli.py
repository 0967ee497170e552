"""``gpu-align run ... --ray [ADDRESS]``: the flags of a Ray run and how the command runs one.

Kept out of :mod:`gpu_align.commands.run` (which only calls :func:`add_arguments` and :func:`execute`) so that
the Ray flags live with the code that reads them, and so that ``gpu-align run`` without ``--ray`` never touches
Ray. Ray itself is imported only once a Ray run starts; without it the command prints one install line.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ray`` group of ``gpu-align run``."""
    g = p.add_argument_group(
        "ray (scale-out over the GPUs of a machine or a cluster; pip install \"gpu-align[ray]\")"
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray: no ADDRESS or 'local' starts Ray on this machine, 'auto' or host:port joins a cluster "
        "('ray start --head' prints it). One worker per GPU (or --workers N on CPUs) aligns shards into "
        "DIR/shards/<i>, which are merged in order into DIR: the same bytes as --shard i/N for every i, then merge",
    )
    g.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="cut the input into N shards of whole identities (default: one per 20,000 photos); fixed by the first "
        "run of DIR: the bytes depend on it, never on the number of workers",
    )
    g.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per GPU; 1 on CPUs)")
    g.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="times one shard may fail (its worker died, an error) before the job stops naming it (default: 2)",
    )
    g.add_argument("--keep-shards", action="store_true", help="keep DIR/shards after the merge (default: removed)")


def _stopped_message(out: Path) -> str:
    """After Ctrl-C: what is kept, and the command that continues (this one with --resume)."""
    from gpu_align.commands.run import resume_command

    return (
        f"gpu-align: stopped; every shard keeps what it committed in {out / 'shards'}. To continue, run:\n  "
        + resume_command()
    )


def _print_summary(result) -> None:
    if result.already_finished:
        print(f"{result.out_dir}: already complete ({result.images} images, {result.classes} identities)")
        return
    retries = f", {result.retries} retried" if result.retries else ""
    print(
        f"{result.out_dir}: {result.images} images, {result.classes} identities from {result.inputs} photos "
        f"({result.skipped} skipped, listed in report.json)\n"
        f"  ray            {result.shards} shards on {result.workers} workers{retries}; "
        f"{result.processed} photos in {result.seconds:.1f} s ({result.images_per_second:.1f}/s), "
        f"merge {result.merge_seconds:.1f} s"
    )


def execute(args: argparse.Namespace, opts) -> int:
    """Run ``opts`` on Ray with the ``--ray`` flags of ``args``; prints the summary, returns the exit code."""
    from gpu_align.commands.run import run_as_command
    from gpu_align.scale.driver import import_ray

    import_ray()  # first: without Ray, one install line and nothing else happens
    from gpu_align.scale.driver import run_ray
    from gpu_align.scale.plan import RayOptions

    ray_opts = RayOptions(
        address=args.ray,
        shards=args.shards,
        workers=args.workers,
        retries=args.retries,
        keep_shards=args.keep_shards,
    )
    return run_as_command(lambda: run_ray(opts, ray_opts), Path(opts.out), _print_summary, _stopped_message)
