"""Placeholder for `gpu-align pack` (being written); registers the command so the CLI parses."""

from __future__ import annotations

import argparse

from packer.errors import UserError


def _run(args: argparse.Namespace) -> int:
    raise UserError("'pack' is not available yet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("pack", help="(not available yet)").set_defaults(func=_run)
