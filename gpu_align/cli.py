"""``gpu-align`` console script: ``run`` and ``demo`` (the aligner, needs torch) plus the packer's commands."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

from packer.cli import run as _run


def _registrars():
    # Imported here so that `gpu-align verify ...` does not pay for importing torch.
    from gpu_align.commands import demo, run

    return [run.add_parser, demo.add_parser]


def run(argv: Sequence[str] | None = None) -> int:
    """Run one ``gpu-align`` command line; returns its exit code (what tests call)."""
    from gpu_align.commands.run import pack_photos

    # `gpu-align pack` of photos (aligned=0 lines) aligns them; `python -m packer pack` only reports them.
    return _run(argv, extra=_registrars(), defaults={"aligner": pack_photos})


def cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """OpenMP defaults for this process, before torch (and its OpenMP runtime) loads; a user's own values win.

    ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning, so on a busy machine they do not
    burn the time slices the working threads need (benchmarks/RESULTS.md, "Busy machine": 2.6x the photos/s with
    the machine shared, about the same quiet). ``OMP_NUM_THREADS``: the CPUs this process may run on
    (``sched_getaffinity``: a container's or ``taskset``'s share, not the host's ``cpu_count``).
    Only the ``gpu-align`` command does this: ``import gpu_align`` leaves a library user's environment alone.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if hasattr(os, "sched_getaffinity"):
        environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def main(argv: Sequence[str] | None = None) -> None:
    cpu_defaults()
    sys.exit(run(argv))
