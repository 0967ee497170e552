"""A pack's output folder: one writer at a time (a lock), and what the folder holds when a writer opens it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packer.errors import UserError
from packer.writer.journal import Journal
from packer.writer.names import OUTPUT_ORDER
from packer.writer.report import read_finished_report

__all__ = ["FolderLock", "Found", "check_same_config", "examine"]


class FolderLock:
    """One writer per folder: an exclusive ``flock`` on the folder itself, released by the kernel if we die.

    Creates the folder. UserError when it is not a folder or another process holds the lock.
    """

    def __init__(self, out_dir: Path):
        self._fd: int | None = None
        if not out_dir.exists():
            out_dir.mkdir(parents=True)
        elif not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a folder")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{out_dir} is being written by another gpu-align process; wait for it to finish, or stop "
                "it and then continue its work with --resume"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@dataclass(frozen=True)
class Found:
    """What a writer found in its folder: ``state`` of an unfinished pack to resume, ``report`` of a finished one
    to leave as it is, or neither (start afresh; the folder holds none of our files)."""

    state: dict | None = None
    report: dict | None = None


def examine(out: Path, ours: list[str], journal: Journal, *, resume: bool, overwrite: bool) -> Found:
    """Decide what to do with ``out`` (``ours``: the names a pack owns there); clears it for ``overwrite`` and for
    a resume of a pack killed before its first commit. UserError for a folder that must not be touched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if overwrite:
        _remove(out, ours)
        return Found()
    if journal.state_exists():
        return Found(state=_unfinished_state(out, journal, resume))
    if out.is_dir() and resume and _only_uncommitted_partials(out, ours):
        _remove(out, os.listdir(out))  # killed before its first commit: nothing to keep, start afresh
        return Found()
    if out.is_dir() and any(out.iterdir()):
        return Found(report=_finished_report_to_keep(out, resume))
    return Found()


def _remove(out: Path, names: list[str]) -> None:
    if out.is_dir():
        for name in names:
            (out / name).unlink(missing_ok=True)


def _unfinished_state(out: Path, journal: Journal, resume: bool) -> dict:
    state = journal.read_state()
    if not resume:
        raise UserError(
            f"{out} holds an unfinished pack ({state.get('done', 0)} inputs written): add --resume to "
            "continue it, or --overwrite to start again"
        )
    return state


def _only_uncommitted_partials(out: Path, ours: list[str]) -> bool:
    names = os.listdir(out)
    partials = set(ours) - set(OUTPUT_ORDER)
    return bool(names) and all(n in partials and (out / n).is_file() for n in names)


def _finished_report_to_keep(out: Path, resume: bool) -> dict:
    """The report of the finished pack in the non-empty ``out`` that ``resume`` leaves as it is; else UserError
    (a finished pack without ``resume``, or files that are no pack to resume)."""
    report = read_finished_report(out)
    if report is not None and resume:
        return report
    if report is not None:
        raise UserError(
            f"{out} already holds a finished dataset ({report['counts']['images']} images); use "
            "--overwrite to rebuild it, or choose another folder"
        )
    shown = sorted(os.listdir(out))
    listing = ", ".join(shown[:3]) + (f", … ({len(shown)} entries)" if len(shown) > 3 else "")
    # No state file: there is nothing to resume, so never suggest --resume here.
    if (out / "train.rec").exists():
        what = f"holds a dataset that gpu-align did not finish writing there ({listing})"
    else:
        what = f"is not empty and holds no pack to resume ({listing})"
    raise UserError(
        f"{out} {what}; choose another folder, or use --overwrite to replace gpu-align's files there "
        "(other files are kept)"
    )


def check_same_config(out: Path, saved: Any, config: dict, where: str) -> None:
    """UserError naming each setting or input that differs between the ``saved`` config and ``config``."""
    if saved == config:
        return
    diffs = []
    saved = saved if isinstance(saved, dict) else {}
    for section in ("writer", "input"):
        old, new = saved.get(section) or {}, config[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    raise UserError(
        f"{out} was written with other settings or inputs ({'; '.join(diffs) or where}); "
        "rerun with the same ones, or use --overwrite to start again"
    )
