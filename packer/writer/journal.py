"""The streamed partial files of a pack and the state file that says how much of each is committed.

A commit flushes and fsyncs every partial file, then atomically replaces ``pack.state.json`` with the byte size of
each (and the writer's counters). Reopening for a resume truncates each file to its committed size, so bytes
written after the last commit (a torn tail) are dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from packer import crcfile, recordio
from packer.errors import UserError
from packer.fsutil import atomic_write, sync_file
from packer.writer.names import PARTIAL, STATE_NAME, STREAM

__all__ = ["Journal"]

_STATE_FORMAT = "gpu-align pack state"


def _record_spans(f: BinaryIO, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each record in the first ``size`` bytes of the open ``.rec`` ``f``."""
    spans = []
    for offset, _ in recordio.scan_records(f):
        if offset >= size:
            break
        spans.append((offset, f.tell()))
    return spans


class Journal:
    """The partial files of ``out_dir`` (by :data:`~packer.writer.names.STREAM` key), their sizes, the state file.

    Attributes:
        sizes: committed-or-written bytes per stream key (what the next commit records).
        broken: a write or commit failed part-way: ``sizes`` no longer match the files, so no more commits.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.state_path = out_dir / STATE_NAME
        self.files: dict[str, BinaryIO] = {}
        self.sizes = dict.fromkeys(STREAM, 0)
        self.broken = False

    def partial(self, key: str) -> Path:
        return self.out_dir / (STREAM[key] + PARTIAL)

    # ------------------------------------------------------------------------------------------ state file

    def state_exists(self) -> bool:
        return self.state_path.exists()

    def read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_bytes())
            if state.get("format") != _STATE_FORMAT:
                raise ValueError("not a gpu-align pack state")
            return state
        except (OSError, ValueError) as e:
            raise UserError(f"{self.state_path} is unreadable ({e}); rerun with --overwrite to start again") from None

    def commit(self, fields: Mapping[str, Any]) -> None:
        """Make everything written so far durable, then record ``fields`` (``sizes`` among them) in the state file."""
        if self.broken:
            raise RuntimeError("cannot commit after a failed write")
        try:
            self.sync()
            state = {"format": _STATE_FORMAT, "version": 1, **fields}
            atomic_write(self.state_path, (json.dumps(state, indent=1) + "\n").encode())
        except BaseException:
            self.broken = True
            raise

    def remove_state(self) -> None:
        self.state_path.unlink()

    # ------------------------------------------------------------------------------------------ opening

    def create(self, keys: Iterable[str]) -> None:
        """New, empty partial files for ``keys``."""
        for key in keys:
            self.files[key] = open(self.partial(key), "wb")  # noqa: SIM115 - closed by close()

    def discard(self) -> None:
        """Close and delete every partial file: nothing was committed, so leave no stray files behind."""
        self.close()
        for key in STREAM:
            with contextlib.suppress(OSError):
                self.partial(key).unlink(missing_ok=True)

    def reopen(self, keys: Iterable[str], committed: Mapping[str, Any]) -> None:
        """Reopen the partial files of ``keys`` for appending, truncated to the ``committed`` sizes (a state's
        ``sizes``). UserError when a file is missing or shorter than committed."""
        self.sizes = {k: int(committed.get(k, 0)) for k in STREAM}
        for key in keys:
            f = self._open_existing(key, had_crc="crc" in committed)
            self.files[key] = f
            path = self.partial(key)
            have = os.fstat(f.fileno()).st_size
            if have < self.sizes[key]:
                raise UserError(
                    f"{path} has {have} bytes, fewer than the {self.sizes[key]} committed; this pack cannot be "
                    "resumed, rerun with --overwrite"
                )
            f.truncate(self.sizes[key])  # drop what was written after the last commit
            f.seek(self.sizes[key])

    def _open_existing(self, key: str, had_crc: bool) -> BinaryIO:
        path = self.partial(key)
        try:
            return open(path, "r+b")  # closed by close()
        except FileNotFoundError:
            pass
        if key == "crc" and not had_crc:
            return self._backfill_crc(path)
        if key != "notes" or self.sizes[key]:
            raise UserError(f"{path} is missing; this pack cannot be resumed, rerun with --overwrite") from None
        return open(path, "w+b")  # a pack begun before notes existed: nothing was noted yet

    def _backfill_crc(self, path: Path) -> BinaryIO:
        """A pack begun before checksums existed: checksum what it committed (the .rec is truncated by now)."""
        f = open(path, "w+b")  # noqa: SIM115 - closed by close()
        with open(self.partial("rec"), "rb") as rec:
            spans = _record_spans(rec, self.sizes["rec"])
            self.sizes["crc"] = f.write(crcfile.HEADER + crcfile.span_entries(rec, spans))
        f.flush()
        return f

    # ------------------------------------------------------------------------------------------ writing

    def append(self, chunks: Mapping[str, bytes]) -> None:
        """Append each key's bytes (in ``chunks`` order) and count them in ``sizes``; a failure marks us broken."""
        try:
            for key, data in chunks.items():
                if data:
                    self.files[key].write(data)
                    self.sizes[key] += len(data)
        except BaseException:
            self.broken = True
            raise

    def write_tail(self, key: str, data: bytes) -> None:
        """Append after the streamed data without counting it in ``sizes`` (the meta records of the finalize
        phase): :meth:`drop_tails` removes it, so a finalize redone after a crash starts from the same bytes."""
        self.files[key].write(data)

    def drop_tails(self, keys: Iterable[str]) -> None:
        for key in keys:
            f = self.files[key]
            f.flush()
            f.truncate(self.sizes[key])
            f.seek(self.sizes[key])

    def read(self, key: str) -> bytes:
        """The streamed bytes of ``key`` (its ``sizes`` worth), read from the partial file on disk."""
        if key in self.files:
            self.files[key].flush()
        with open(self.partial(key), "rb") as f:
            return f.read(self.sizes[key])

    def sync(self) -> None:
        for f in self.files.values():
            sync_file(f)

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):  # a failed flush (disk full) must not hide the first error
                f.close()
        self.files = {}

    @property
    def is_open(self) -> bool:
        return bool(self.files)
