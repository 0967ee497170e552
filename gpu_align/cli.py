"""``gpu-align`` console script: ``run`` and ``demo`` (the aligner, needs torch) plus the packer's commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
