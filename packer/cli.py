"""Command line of the packer: ``gpu-align <command>`` (or ``python -m packer <command>``, which needs no torch).

Each command lives in ``packer/commands/<name>.py`` with ``add_parser(subparsers)``, which registers its parser and
sets ``func`` to the function that runs it (returning the exit code). ``gpu_align.cli`` adds ``run`` and ``demo``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable, Sequence

from packer.errors import UserError
from packer.recordio import RecordIOError

PACKER_COMMANDS = ("lst", "pack", "unpack", "inspect", "verify", "reindex", "merge", "to_flat", "bin")

Registrar = Callable[[argparse._SubParsersAction], None]


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """Register one command's parser, the same way for every command (``--help`` keeps the epilog's examples and
    line breaks as written)."""
    return sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_parser(
    extra: Sequence[Registrar] = (), prog: str = "gpu-align", defaults: dict | None = None
) -> argparse.ArgumentParser:
    """The ``gpu-align`` parser: ``extra`` registrars first, then the packer's commands; ``defaults`` become
    attributes of every command's arguments (how ``gpu_align`` hands ``pack`` its aligner without an import)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Face photo folders to training-ready InsightFace RecordIO datasets "
        "(train.rec/.idx/.lst/property), and tools for such datasets.",
        epilog=f"Run '{prog} <command> --help' for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for register in extra:
        register(sub)
    for name in PACKER_COMMANDS:
        importlib.import_module(f"packer.commands.{name}").add_parser(sub)
    parser.set_defaults(**(defaults or {}))
    return parser


def run(
    argv: Sequence[str] | None = None,
    extra: Sequence[Registrar] = (),
    prog: str = "gpu-align",
    defaults: dict | None = None,
) -> int:
    """Parse ``argv`` and run the command; user-facing failures become one ``error:`` line and exit code 2."""
    args = build_parser(extra, prog, defaults).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, RecordIOError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        hint = " — free some space and rerun with --resume" if e.errno == errno.ENOSPC else ""
        print(f"{prog}: error: {e.strerror or e}{where}{hint}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv, prog="python -m packer"))
