"""Placeholder for `gpu-align merge` (being written); registers the command so the CLI parses."""

from __future__ import annotations

import argparse

from packer.errors import UserError


def _run(args: argparse.Namespace) -> int:
    raise UserError("'merge' is not available yet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("merge", help="(not available yet)").set_defaults(func=_run)
