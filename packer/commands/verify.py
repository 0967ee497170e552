"""Placeholder for `gpu-align verify` (being written); registers the command so the CLI parses."""

from __future__ import annotations

import argparse

from packer.errors import UserError


def _run(args: argparse.Namespace) -> int:
    raise UserError("'verify' is not available yet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("verify", help="(not available yet)").set_defaults(func=_run)
