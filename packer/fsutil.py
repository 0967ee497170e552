"""Durable file updates: fsync of files and directories, atomic replace of small files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames/creations inside directory ``path`` durable (no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems (and Windows) refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(f: BinaryIO) -> None:
    """Flush Python's buffer and the OS cache of an open file to disk."""
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new file, never a mix.

    Writes ``<path>.tmp`` in the same directory, fsyncs it, renames it over ``path`` and fsyncs the directory.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                sync_file(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync:
        fsync_dir(path.parent)
