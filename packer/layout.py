"""The streaming, resumable dataset writer behind ``pack``, ``merge``, ``to-flat`` and ``run``'s packer process.

Inputs arrive one by one, grouped by identity (:class:`PackItem`). At each group boundary the writer applies
``min_images``, gives the group the next contiguous label (0..C-1, in order of appearance) and appends its records
to ``train.rec.partial`` / ``train.idx.partial`` / ``train.lst.partial``. Memory holds one identity's records plus
a ``[first_key, end_key)`` pair per identity.

Layouts (see README "Layouts and label styles"):

- ``insightface``: image keys 1..N in input order, then key 0 with label ``[N+1, N+1+K]``, then K identity records
  (keys N+1..N+K, label ``[first_key, end_key)``), all with empty bodies. This is face2rec2's write order.
- ``flat``: keys 0..N-1, scalar labels, no meta records (DALI's ``fn.readers.mxnet`` treats every record as a
  sample). With ``shuffle_seed`` the records are permuted at close: the finished partial file is rewritten in the
  order ``numpy.random.RandomState(seed).permutation(N)`` (a frozen stream, so a seed gives the same order on any
  numpy), keys renumbered 0..N-1 in the new order and ``train.lst`` permuted with them.

Crash safety: all outputs are ``*.partial`` until the end. The writer commits (flush + fsync of every partial file,
then an atomic rewrite of ``pack.state.json`` with the byte size of each) at identity boundaries, at most once per
``commit_interval`` seconds. ``resume=True`` truncates the partial files to the committed sizes and reports in
``done`` how many inputs the caller must skip. Closing goes through recorded phases (``finalize``: meta records,
shuffle, ``property``, ``report.json``; ``rename``: partials to final names, ``report.json`` last; then the state
file is removed), each redone from its start after a crash. The output depends only on the inputs and the
settings, so a pack killed at any moment and resumed is byte-identical to an uninterrupted one.

Test hook: ``GPU_ALIGN_TEST_SLOW_WRITE=<seconds>`` sleeps that long per input, per shuffled record and between
closing steps, and commits at every identity boundary, so tests can SIGKILL a pack mid-way. It does not change
the output.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from packer import crcfile, recordio
from packer.errors import UserError
from packer.fsutil import atomic_write, fsync_dir, sync_file
from packer.lst import LST_ENCODING, LST_ERRORS, LstEntry, format_lst_line

__all__ = [
    "LABEL_STYLES",
    "LAYOUTS",
    "STATE_NAME",
    "DatasetWriter",
    "PackItem",
    "WriteSummary",
    "shuffle_order",
]

LAYOUTS = ("insightface", "flat")
LABEL_STYLES = ("scalar", "pair")
STATE_NAME = "pack.state.json"
REPORT_NAME = "report.json"
SLOW_ENV = "GPU_ALIGN_TEST_SLOW_WRITE"
_STATE_FORMAT = "gpu-align pack state"
_REPORT_FORMAT = "gpu-align pack report"
_PARTIAL = ".partial"
_SHUFFLED = ".shuffled.partial"
# Files appended while streaming: key -> final (or internal) name; their partials are "<name>.partial".
_STREAM = {
    "rec": "train.rec",
    "idx": "train.idx",
    "lst": "train.lst",
    "skipped": "skipped.jsonl",
    "notes": "notes.jsonl",
    "groups": "groups.jsonl",
    "crc": "train.rec.crc",  # one checksum per record (packer.crcfile), read by verify
}
_OUTPUT_ORDER = ("train.rec", "train.idx", "train.rec.crc", "train.lst", "property", REPORT_NAME)  # report last


class _NoGroup:
    def __repr__(self) -> str:
        return "<no group>"


_NO_GROUP = _NoGroup()


@dataclass
class PackItem:
    """One input of the writer.

    Attributes:
        group: identity key (source folder / source label); inputs must arrive grouped by it.
        body: the stored image bytes (JPEG/PNG, written as-is); None = this input produced no image.
        lst: its ``train.lst`` line (label replaced by the assigned label); None = ``1<TAB>source<TAB>label``.
        source: source path, for the report.
        skip_reason: why ``body`` is None (``"kind: detail"``; the report counts by the part before ``:``).
        note: JSON-able facts about this input for ``report.json``'s ``notes``, with a ``"kind"`` the report counts
            (e.g. ``{"kind": "multi-face", ...}``: the chosen face and its runner-up); None = nothing to note.
    """

    group: str
    body: bytes | None
    lst: LstEntry | None = None
    source: str = ""
    skip_reason: str | None = None
    note: dict[str, Any] | None = None


@dataclass
class WriteSummary:
    """Counts of a finished dataset (read back from its ``report.json``)."""

    out_dir: Path
    layout: str
    label_style: str
    num_inputs: int
    num_images: int
    num_classes: int
    num_skipped: int
    dropped_identities: int
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None
    resumed_from: int = 0  # inputs that were already written when this writer opened
    already_finished: bool = False  # resume found the dataset finished: nothing was written


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The flat layout's record order: position j holds input record ``order[j]``. (n,) int64."""
    if n == 0:
        return np.zeros(0, np.int64)
    return np.random.RandomState(seed).permutation(n).astype(np.int64)  # legacy RandomState: a frozen stream


def _record_spans(f: BinaryIO, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each record in the first ``size`` bytes of the open ``.rec`` ``f``."""
    spans = []
    for offset, _ in recordio.scan_records(f):
        if offset >= size:
            break
        spans.append((offset, f.tell()))
    return spans


def _report_bytes(obj: Any) -> bytes:
    # Readable UTF-8; file names that are not valid UTF-8 (surrogate escapes) become \udcXX JSON escapes.
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class DatasetWriter:
    """Write an InsightFace or flat RecordIO dataset into ``out_dir``, resumably. A context manager.

    Args:
        out_dir: output folder (created). Non-empty without ``resume``/``overwrite`` is a :class:`UserError`.
        layout: ``"insightface"`` (keys 1..N + header + identity records) or ``"flat"`` (keys 0..N-1 only).
        label_style: ``"scalar"`` (flag 0, label in the header; InsightFace's released recs) or ``"pair"``
            (``[class, 1.0]``, flag 2, as face2rec2). The flat layout is always scalar.
        image_size: ``(H, W)`` or one int, written to ``property`` as ``C,H,W``.
        min_images: identities with fewer stored images are dropped (reported) and get no label.
        shuffle_seed: flat layout only: permute the records at close with this seed.
        resume: continue the unfinished pack in ``out_dir`` (its settings and ``config`` must match);
            an empty or missing ``out_dir`` starts fresh, a finished one with the same settings is left as is.
        overwrite: delete gpu-align's files in ``out_dir`` (outputs, partials, state; nothing else) first.
        write_lst: write ``train.lst`` (one line per stored image, in record order).
        config: the caller's description of its inputs (JSON-able, e.g. input hash); part of the resume check
            and of ``report.json``.
        commit_interval: seconds between commits (a crash loses at most this much work).
        companions: names of files the caller keeps in ``out_dir`` beside the writer's own (e.g. the run's input
            list for ``--resume``); counted as gpu-align's files: removed by ``overwrite`` and at the end.

    Attributes:
        done: inputs committed to disk. Right after opening it is what a resumed pack already holds (the caller
            skips that many inputs); it grows at each commit, so after :meth:`abort` it is what a resume will keep.
        report: the finished ``report.json`` as a dict once :meth:`close` returned (None before).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        layout: str = "insightface",
        label_style: str = "scalar",
        image_size: int | tuple[int, int] = (112, 112),
        min_images: int = 1,
        shuffle_seed: int | None = None,
        resume: bool = False,
        overwrite: bool = False,
        write_lst: bool = True,
        config: dict | None = None,
        commit_interval: float = 1.0,
        companions: Sequence[str] = (),
    ):
        if layout not in LAYOUTS:
            raise UserError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        if label_style not in LABEL_STYLES:
            raise UserError(f"unknown label style {label_style!r}; choose one of: {', '.join(LABEL_STYLES)}")
        if layout == "flat" and label_style != "scalar":
            raise UserError(
                "the flat layout stores scalar labels (DALI's mxnet reader returns flag-many labels per "
                "sample); --label-style pair applies to the insightface layout only"
            )
        if shuffle_seed is not None and layout != "flat":
            raise UserError(
                "--shuffle needs --layout flat: the insightface layout keeps each identity's images on "
                "consecutive keys, which its identity records describe"
            )
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if int(h) < 1 or int(w) < 1:
            raise UserError(f"image size must be positive, got {h}x{w}")
        if int(min_images) < 1:
            raise UserError(f"min_images must be at least 1, got {min_images}")
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.label_style = label_style
        self.image_size = (int(h), int(w))
        self.min_images = int(min_images)
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.write_lst = bool(write_lst)
        self.companions = tuple(companions)
        self.config = _jsonable(
            {
                "writer": {
                    "layout": layout,
                    "label_style": label_style,
                    "image_size": list(self.image_size),
                    "min_images": self.min_images,
                    "shuffle_seed": self.shuffle_seed,
                    "write_lst": self.write_lst,
                },
                "input": config or {},
            }
        )
        self._slow = float(os.environ.get(SLOW_ENV) or 0)
        self.commit_interval = 0.0 if self._slow else float(commit_interval)
        self._first_key = 1 if layout == "insightface" else 0
        self._state_path = self.out_dir / STATE_NAME
        self._files: dict[str, BinaryIO] = {}
        self._sizes = dict.fromkeys(_STREAM, 0)
        self._inputs = 0
        self._num_images = 0
        self._num_skipped = 0
        self._dropped = 0
        self._ranges: list[tuple[int, int]] = []
        self._seen: set[str] = set()
        self._buf: list[PackItem] = []
        self._cur: object = _NO_GROUP
        self._phase = "stream"
        self._outputs: dict[str, str] = {}
        self._finished_report: dict | None = None
        self._broken = False  # a write failed part-way: the in-memory sizes no longer match the files
        self._closed = False
        self.report: dict[str, Any] | None = None  # the finished report.json, once closed
        self._last_commit = time.monotonic()
        self.done = 0
        self._lock_fd: int | None = None
        self._lock()
        try:
            self._open(resume=resume, overwrite=overwrite)
        except BaseException:
            self._unlock()
            raise
        self.done = self._resumed_from = self._inputs

    # ------------------------------------------------------------------------------------------ opening

    def _lock(self) -> None:
        """One writer per folder: an exclusive ``flock`` on the folder itself, released by the kernel if we die."""
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
        elif not self.out_dir.is_dir():
            raise UserError(f"{self.out_dir} exists and is not a folder")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        fd = os.open(self.out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.out_dir} is being written by another gpu-align process; wait for it to finish, or stop "
                "it and then continue its work with --resume"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _partial(self, key: str) -> Path:
        return self.out_dir / (_STREAM[key] + _PARTIAL)

    def _our_names(self) -> list[str]:
        names = [*_OUTPUT_ORDER, STATE_NAME, STATE_NAME + ".tmp", "report.html", "report.html.tmp"]
        names += [n + _PARTIAL for n in (*_STREAM.values(), "property", REPORT_NAME)]
        names += [n + _SHUFFLED for n in ("train.rec", "train.idx", "train.rec.crc", "train.lst")]
        return names + [n for c in self.companions for n in (c, c + ".tmp")]

    def _open(self, *, resume: bool, overwrite: bool) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        if overwrite:
            if out.is_dir():
                for name in self._our_names():
                    (out / name).unlink(missing_ok=True)
        elif self._state_path.exists():
            state = self._read_state()
            if not resume:
                raise UserError(
                    f"{out} holds an unfinished pack ({state.get('done', 0)} inputs written): add --resume to "
                    "continue it, or --overwrite to start again"
                )
            self._resume(state)
            return
        elif out.is_dir() and resume and self._only_uncommitted_partials():
            for name in os.listdir(out):  # killed before its first commit: nothing to keep, start afresh
                (out / name).unlink()
        elif out.is_dir() and any(out.iterdir()):
            report = self._read_finished_report()
            if report is not None and resume:
                self._check_config(report.get("config"), f"the finished pack's {REPORT_NAME}")
                self._finished_report = report
                self._inputs = int(report["counts"]["inputs"])
                return
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
        out.mkdir(parents=True, exist_ok=True)
        try:
            for key in _STREAM:
                if key != "lst" or self.write_lst:
                    self._files[key] = open(self._partial(key), "wb")  # noqa: SIM115 - closed in close()/abort()
            self._write("crc", crcfile.HEADER)
            self._commit()
        except BaseException:
            # Nothing was committed: leave no stray partials, so that rerunning the same command just works.
            self._close_handles()
            for key in _STREAM:
                with contextlib.suppress(OSError):
                    self._partial(key).unlink(missing_ok=True)
            raise

    def _only_uncommitted_partials(self) -> bool:
        names = os.listdir(self.out_dir)
        ours = set(self._our_names()) - set(_OUTPUT_ORDER)
        return bool(names) and all(n in ours and (self.out_dir / n).is_file() for n in names)

    def _read_state(self) -> dict:
        try:
            state = json.loads(self._state_path.read_bytes())
            if state.get("format") != _STATE_FORMAT:
                raise ValueError("not a gpu-align pack state")
            return state
        except (OSError, ValueError) as e:
            raise UserError(f"{self._state_path} is unreadable ({e}); rerun with --overwrite to start again") from None

    def _read_finished_report(self) -> dict | None:
        try:
            report = json.loads((self.out_dir / REPORT_NAME).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(report, dict) or report.get("format") != _REPORT_FORMAT:
            return None
        if not all((self.out_dir / name).is_file() for name in report.get("files", [])):
            return None
        return report

    def _check_config(self, saved: Any, where: str) -> None:
        if saved == self.config:
            return
        diffs = []
        saved = saved if isinstance(saved, dict) else {}
        for section in ("writer", "input"):
            old, new = saved.get(section) or {}, self.config[section]
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    diffs.append(f"{key}: {old.get(key)!r} then, {new.get(key)!r} now")
        raise UserError(
            f"{self.out_dir} was written with other settings or inputs ({'; '.join(diffs) or where}); "
            "rerun with the same ones, or use --overwrite to start again"
        )

    def _resume(self, state: dict) -> None:
        self._check_config(state.get("config"), STATE_NAME)
        self._phase = state["phase"]
        self._sizes = {k: int(state["sizes"].get(k, 0)) for k in _STREAM}
        self._inputs = int(state["done"])
        self._num_images = int(state["num_images"])
        self._num_skipped = int(state["num_skipped"])
        self._dropped = int(state["dropped"])
        self._outputs = dict(state.get("outputs") or {})
        if self._phase == "rename":
            return  # everything is written; close() finishes the renames
        for key in _STREAM:
            if key == "lst" and not self.write_lst:
                continue
            path = self._partial(key)
            try:
                f = open(path, "r+b")  # noqa: SIM115 - closed in close()/abort()
            except FileNotFoundError:
                if key == "crc" and "crc" not in state["sizes"]:
                    # a pack begun before checksums existed: checksum what it committed (rec is truncated by now)
                    f = open(path, "w+b")  # noqa: SIM115 - closed in close()/abort()
                    with open(self._partial("rec"), "rb") as rec:
                        spans = _record_spans(rec, self._sizes["rec"])
                        self._sizes["crc"] = f.write(crcfile.HEADER + crcfile.span_entries(rec, spans))
                    f.flush()
                elif key != "notes" or self._sizes[key]:
                    raise UserError(f"{path} is missing; this pack cannot be resumed, rerun with --overwrite") from None
                else:
                    f = open(path, "w+b")  # noqa: SIM115 - a pack begun before notes existed: nothing was noted yet
            self._files[key] = f
            have = os.fstat(f.fileno()).st_size
            if have < self._sizes[key]:
                raise UserError(
                    f"{path} has {have} bytes, fewer than the {self._sizes[key]} committed; this pack cannot be "
                    "resumed, rerun with --overwrite"
                )
            f.truncate(self._sizes[key])  # drop what was written after the last commit
            f.seek(self._sizes[key])
        groups = self._files["groups"]
        groups.seek(0)
        for line in groups.read(self._sizes["groups"]).splitlines():
            g = json.loads(line)
            self._seen.add(g["group"])
            if g["label"] is not None:
                self._ranges.append((g["start"], g["end"]))
        groups.seek(self._sizes["groups"])
        if len(self._ranges) != int(state["num_classes"]):
            raise UserError(f"{self._partial('groups')} does not match {STATE_NAME}; rerun with --overwrite")

    # ------------------------------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        if self._finished_report is not None or self._phase != "stream":
            raise RuntimeError(f"all inputs were already written ({self._inputs}); call close()")

    def add(self, item: PackItem) -> None:
        """Add the next input. Its records are written when its identity's last input has arrived."""
        self._check_writable()
        if self._slow:
            time.sleep(self._slow)
        if item.group != self._cur:
            if self._cur is not _NO_GROUP:
                self._finish_group()
            if item.group in self._seen:
                raise UserError(
                    f"input {self._inputs + len(self._buf) + 1} ({item.source or item.group}): identity "
                    f"{item.group!r} appears again after other identities; each identity's inputs must be together"
                )
            self._cur = item.group
        self._buf.append(item)

    def _finish_group(self) -> None:
        items, group = self._buf, self._cur
        self._buf, self._cur = [], _NO_GROUP
        n_good = sum(it.body is not None for it in items)
        keep = n_good >= self.min_images
        label = len(self._ranges) if keep and n_good else None
        too_few = f"too few images: identity has {n_good}, fewer than min_images={self.min_images}"
        recs: list[bytes] = []
        crcs: list[bytes] = []
        idx: list[str] = []
        lsts: list[str] = []
        skipped: list[str] = []
        notes = [json.dumps({"path": it.source, "group": group, **it.note}) + "\n" for it in items if it.note]
        key = start = self._first_key + self._num_images
        offset = self._sizes["rec"]
        if label is not None:
            label_value = [float(label), 1.0] if self.label_style == "pair" else float(label)
        for it in items:
            if it.body is None or label is None:
                reason = (it.skip_reason or "no image") if it.body is None else too_few
                entry = {"path": it.source or (it.lst.path if it.lst else ""), "reason": reason, "group": group}
                skipped.append(json.dumps(entry) + "\n")
                continue
            rec = recordio.encode_record(recordio.pack(recordio.IRHeader(0, label_value, key, 0), it.body))
            recs.append(rec)
            crcs.append(crcfile.entry(rec))
            idx.append(f"{key}\t{offset}\n")
            offset += len(rec)
            key += 1
            if self.write_lst:
                e = it.lst if it.lst is not None else LstEntry(1, it.source or f"{group}/{key - 1}", 0)
                lsts.append(format_lst_line(e.with_label(label)) + "\n")
        line = {"group": group, "label": label, "start": start, "end": key, "inputs": len(items)}
        try:
            self._write("rec", b"".join(recs))
            self._write("idx", "".join(idx).encode())
            self._write("crc", b"".join(crcs))
            if self.write_lst:
                self._write("lst", "".join(lsts).encode(LST_ENCODING, LST_ERRORS))
            self._write("skipped", "".join(skipped).encode())
            self._write("notes", "".join(notes).encode())
            self._write("groups", (json.dumps(line) + "\n").encode())
        except BaseException:
            self._broken = True
            raise
        if label is not None:
            self._ranges.append((start, key))
        self._seen.add(group)
        self._num_images += len(recs)
        self._num_skipped += len(skipped)
        self._dropped += int(n_good > 0 and not keep)
        self._inputs += len(items)
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self._commit()

    def _write(self, key: str, data: bytes) -> None:
        if data:
            self._files[key].write(data)
            self._sizes[key] += len(data)

    def _commit(self) -> None:
        """Make everything written so far durable and record it: fsync the partials, then replace the state."""
        if self._broken:
            raise RuntimeError("cannot commit after a failed write")
        try:
            for f in self._files.values():
                sync_file(f)
            state = {
                "format": _STATE_FORMAT,
                "version": 1,
                "phase": self._phase,
                "done": self._inputs,
                "sizes": self._sizes,
                "num_images": self._num_images,
                "num_classes": len(self._ranges),
                "num_skipped": self._num_skipped,
                "dropped": self._dropped,
                "outputs": self._outputs,
                "config": self.config,
            }
            atomic_write(self._state_path, (json.dumps(state, indent=1) + "\n").encode())
        except BaseException:
            self._broken = True
            raise
        self._last_commit = time.monotonic()
        self.done = self._inputs

    # ------------------------------------------------------------------------------------------ closing

    def _step(self) -> None:
        if self._slow:
            time.sleep(self._slow * 20)

    def close(self, report_extra: dict | None = None) -> WriteSummary:
        """Finish: last identity, meta records or shuffle, ``property``, ``report.json``, renames.

        ``report_extra`` (JSON-able) is stored under ``"extra"`` in ``report.json``.
        """
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        resumed_from = self._resumed_from
        finished = self._finished_report is not None
        if not finished:
            if self._phase == "stream":
                if self._cur is not _NO_GROUP:
                    self._finish_group()
                self._phase = "finalize"
                self._commit()
                self._step()
            if self._phase == "finalize":
                self._finalize(report_extra)
            self._rename_outputs()
        self._closed = True
        self._unlock()
        report = self.report = json.loads((self.out_dir / REPORT_NAME).read_bytes())
        counts = report["counts"]
        return WriteSummary(
            out_dir=self.out_dir,
            layout=report["layout"],
            label_style=report["label_style"],
            num_inputs=counts["inputs"],
            num_images=counts["images"],
            num_classes=counts["classes"],
            num_skipped=counts["skipped"],
            dropped_identities=counts["dropped_identities"],
            skipped_by_reason=report["skipped_by_reason"],
            report_path=self.out_dir / REPORT_NAME,
            resumed_from=resumed_from,
            already_finished=finished,
        )

    def _finalize(self, report_extra: dict | None) -> None:
        for key in ("rec", "idx", "crc"):  # drop meta records of an earlier, interrupted finalize
            f = self._files[key]
            f.flush()
            f.truncate(self._sizes[key])
            f.seek(self._sizes[key])
        outputs = {name: name + _PARTIAL for name in ("train.rec", "train.idx", "train.rec.crc")}
        if self.write_lst:
            outputs["train.lst"] = "train.lst" + _PARTIAL
        if self.layout == "insightface":
            self._write_meta_records()
        elif self.shuffle_seed is not None:
            self._write_shuffled()
            outputs = {name: name + _SHUFFLED for name in outputs}
        for f in self._files.values():
            sync_file(f)
        self._close_handles()
        self._step()
        n_classes = len(self._ranges)
        h, w = self.image_size
        atomic_write(self.out_dir / ("property" + _PARTIAL), f"{n_classes},{h},{w}\n".encode())
        outputs["property"] = "property" + _PARTIAL
        outputs[REPORT_NAME] = REPORT_NAME + _PARTIAL
        atomic_write(self.out_dir / outputs[REPORT_NAME], _report_bytes(self._report(list(outputs), report_extra)))
        self._step()
        self._outputs = outputs
        self._phase = "rename"
        self._commit()

    def _write_meta_records(self) -> None:
        """face2rec2's tail: key 0 ``[N+1, N+1+K]``, then identity records ``[start, end)`` with keys N+1..N+K."""
        n, k = self._num_images, len(self._ranges)
        metas = [(0, [float(n + 1), float(n + 1 + k)])]
        metas += [(n + 1 + i, [float(s), float(e)]) for i, (s, e) in enumerate(self._ranges)]
        rec, idx, crc = self._files["rec"], self._files["idx"], self._files["crc"]
        offset = self._sizes["rec"]
        lines = []
        for key, label in metas:
            data = recordio.encode_record(recordio.pack(recordio.IRHeader(0, label, key, 0), b""))
            rec.write(data)
            crc.write(crcfile.entry(data))
            lines.append(f"{key}\t{offset}\n")
            offset += len(data)
        idx.write("".join(lines).encode())

    def _write_shuffled(self) -> None:
        """Rewrite the flat partials in :func:`shuffle_order`; keys (and header ids) become the new positions."""
        for f in self._files.values():
            f.flush()
        n = self._num_images
        offsets = np.zeros(n, np.int64)
        with open(self._partial("idx"), "rb") as f:
            for i, line in enumerate(f.read(self._sizes["idx"]).splitlines()):
                offsets[i] = int(line.split(b"\t")[1])
        lst_starts = np.zeros(n, np.int64)
        if self.write_lst:
            with open(self._partial("lst"), "rb") as f:
                lens = [len(line) for line in f.read(self._sizes["lst"]).splitlines(keepends=True)]
            lst_starts[1:] = np.cumsum(lens)[:-1] if n else []
        names = ("train.rec", "train.idx", "train.rec.crc", "train.lst")
        out = {name: self.out_dir / (name + _SHUFFLED) for name in names}
        with contextlib.ExitStack() as stack:
            src_rec = stack.enter_context(open(self._partial("rec"), "rb"))
            dst_rec = stack.enter_context(open(out["train.rec"], "wb"))
            dst_idx = stack.enter_context(open(out["train.idx"], "wb"))
            dst_crc = stack.enter_context(open(out["train.rec.crc"], "wb"))
            dst_crc.write(crcfile.HEADER)
            if self.write_lst:
                src_lst = stack.enter_context(open(self._partial("lst"), "rb"))
                dst_lst = stack.enter_context(open(out["train.lst"], "wb"))
            pos = 0
            for j, i in enumerate(shuffle_order(n, self.shuffle_seed).tolist()):
                payload = bytearray(recordio.read_record_at(src_rec, int(offsets[i])))
                struct.pack_into("<Q", payload, 8, j)  # IRHeader.id = key
                data = recordio.encode_record(payload)
                dst_rec.write(data)
                dst_crc.write(crcfile.entry(data))
                dst_idx.write(f"{j}\t{pos}\n".encode())
                pos += len(data)
                if self.write_lst:
                    src_lst.seek(int(lst_starts[i]))
                    dst_lst.write(src_lst.readline())
                if self._slow:
                    time.sleep(self._slow)
            for f in (dst_rec, dst_idx, dst_crc, *([dst_lst] if self.write_lst else [])):
                sync_file(f)

    def _report(self, files: list[str], extra: dict | None) -> dict:
        skipped = []
        with open(self._partial("skipped"), "rb") as f:
            for line in f.read(self._sizes["skipped"]).splitlines():
                s = json.loads(line)
                skipped.append({"path": s["path"], "reason": s["reason"], "identity": s["group"]})
        by_reason = Counter(s["reason"].split(":")[0].strip() for s in skipped)
        notes = []
        with open(self._partial("notes"), "rb") as f:
            for line in f.read(self._sizes["notes"]).splitlines():
                n = json.loads(line)
                notes.append({"path": n.pop("path"), "identity": n.pop("group"), **n})
        report = {
            "format": _REPORT_FORMAT,
            "version": 1,
            "layout": self.layout,
            "label_style": self.label_style,
            "image_size": list(self.image_size),
            "files": files,
            "counts": {
                "inputs": self._inputs,
                "images": self._num_images,
                "classes": len(self._ranges),
                "skipped": len(skipped),
                "dropped_identities": self._dropped,
            },
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "notes_by_kind": dict(sorted(Counter(n["kind"] for n in notes).items())),
            "config": self.config,
            "skipped": skipped,
            "notes": notes,
        }
        if extra:
            report["extra"] = _jsonable(extra)
        return report

    def _rename_outputs(self) -> None:
        out = self.out_dir
        for name in _OUTPUT_ORDER:  # report.json last: its presence marks a finished dataset
            src = self._outputs.get(name)
            if src is not None and (out / src).exists():
                os.replace(out / src, out / name)
                self._step()
        fsync_dir(out)
        for name in self._our_names():
            if name not in _OUTPUT_ORDER and name != STATE_NAME:  # sources are renamed by now: leftovers only
                (out / name).unlink(missing_ok=True)
        fsync_dir(out)
        self._state_path.unlink()
        fsync_dir(out)

    def _close_handles(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError):  # a failed flush (disk full) must not hide the first error
                f.close()
        self._files = {}

    def abort(self) -> None:
        """Stop without finishing; keep everything committed (plus finished identities) for ``resume``."""
        if self._closed:
            return
        try:
            if self._phase == "stream" and not self._broken and self._files:
                with contextlib.suppress(OSError):
                    self._commit()
        finally:
            self._close_handles()
            self._closed = True
            self._unlock()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()
