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

Parts (package :mod:`packer.writer`): ``folder`` (the lock, what the folder holds at open), ``journal`` (the
partial files and the state file), ``records`` (the bytes of an identity, the meta records, the shuffle) and
``report`` (``report.json``). This class holds the counters and runs the phases.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from packer import crcfile
from packer.errors import UserError
from packer.fsutil import atomic_write, fsync_dir
from packer.lst import LstEntry
from packer.writer import records
from packer.writer.folder import FolderLock, check_same_config, examine
from packer.writer.journal import Journal
from packer.writer.names import OUTPUT_ORDER, PARTIAL, REPORT_NAME, SHUFFLED, STATE_NAME, STREAM, our_names
from packer.writer.records import shuffle_order
from packer.writer.report import WriteSummary, build_report, jsonable, report_bytes, summary_of

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
_RECORD_OUTPUTS = ("train.rec", "train.idx", "train.rec.crc")


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


def _check_settings(
    layout: str, label_style: str, image_size: int | tuple[int, int], min_images: int, shuffle_seed: int | None
) -> tuple[int, int]:
    """UserError for settings that do not go together; returns the image size as ``(H, W)``."""
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
    return int(h), int(w)


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
        self.image_size = _check_settings(layout, label_style, image_size, min_images, shuffle_seed)
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.label_style = label_style
        self.min_images = int(min_images)
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.write_lst = bool(write_lst)
        self.companions = tuple(companions)
        self.config = jsonable(
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
        self.commit_interval = float(commit_interval)
        self._first_key = 1 if layout == "insightface" else 0
        self._journal = Journal(self.out_dir)
        # counters, committed with the journal
        self._inputs = 0
        self._num_images = 0
        self._num_skipped = 0
        self._dropped = 0
        self._ranges: list[tuple[int, int]] = []  # [first_key, end_key) of each labelled identity
        self._seen: set[str] = set()
        # the identity being collected
        self._buf: list[PackItem] = []
        self._cur: object = _NO_GROUP
        self._phase = "stream"  # "stream" -> "finalize" -> "rename"
        self._outputs: dict[str, str] = {}  # final name -> the file that becomes it
        self._finished_report: dict | None = None
        self._closed = False
        self.report: dict[str, Any] | None = None  # the finished report.json, once closed
        self._last_commit = time.monotonic()
        self.done = 0
        self._lock = FolderLock(self.out_dir)
        try:
            self._open(resume=resume, overwrite=overwrite)
        except BaseException:  # e.g. a resume refused part-way: the partials it had reopened are closed too
            self._journal.close()
            self._lock.release()
            raise
        self.done = self._resumed_from = self._inputs

    # ------------------------------------------------------------------------------------------ opening

    def _stream_keys(self) -> list[str]:
        return [key for key in STREAM if key != "lst" or self.write_lst]

    def _open(self, *, resume: bool, overwrite: bool) -> None:
        found = examine(self.out_dir, our_names(self.companions), self._journal, resume=resume, overwrite=overwrite)
        if found.state is not None:
            self._resume(found.state)
        elif found.report is not None:
            where = f"the finished pack's {REPORT_NAME}"
            check_same_config(self.out_dir, found.report.get("config"), self.config, where)
            self._finished_report = found.report
            self._inputs = int(found.report["counts"]["inputs"])
        else:
            self._start()

    def _start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._journal.create(self._stream_keys())
            self._journal.append({"crc": crcfile.HEADER})
            self._commit()
        except BaseException:
            # Nothing was committed: leave no stray partials, so that rerunning the same command just works.
            self._journal.discard()
            raise

    def _resume(self, state: dict) -> None:
        check_same_config(self.out_dir, state.get("config"), self.config, STATE_NAME)
        self._phase = state["phase"]
        self._inputs = int(state["done"])
        self._num_images = int(state["num_images"])
        self._num_skipped = int(state["num_skipped"])
        self._dropped = int(state["dropped"])
        self._outputs = dict(state.get("outputs") or {})
        renaming = self._phase == "rename"  # everything is written; close() finishes the renames
        self._journal.reopen([] if renaming else self._stream_keys(), state["sizes"])
        if not renaming:
            self._restore_groups(int(state["num_classes"]))

    def _restore_groups(self, num_classes: int) -> None:
        """The identities seen and the labelled ranges, from the committed ``groups.jsonl``."""
        for line in self._journal.read("groups").splitlines():
            g = json.loads(line)
            self._seen.add(g["group"])
            if g["label"] is not None:
                self._ranges.append((g["start"], g["end"]))
        if len(self._ranges) != num_classes:
            raise UserError(f"{self._journal.partial('groups')} does not match {STATE_NAME}; rerun with --overwrite")

    # ------------------------------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        if self._finished_report is not None or self._phase != "stream":
            raise RuntimeError(f"all inputs were already written ({self._inputs}); call close()")

    def add(self, item: PackItem) -> None:
        """Add the next input. Its records are written when its identity's last input has arrived."""
        self._check_writable()
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
        items, group = self._buf, cast(str, self._cur)  # PackItem.group as given (not converted)
        self._buf, self._cur = [], _NO_GROUP
        n_good = sum(it.body is not None for it in items)
        keep = n_good >= self.min_images
        label = len(self._ranges) if keep and n_good else None
        first = self._first_key + self._num_images
        written = records.encode_group(
            items,
            group,
            label=label,
            first_key=first,
            offset=self._journal.sizes["rec"],
            label_style=self.label_style,
            write_lst=self.write_lst,
            too_few=f"too few images: identity has {n_good}, fewer than min_images={self.min_images}",
        )
        self._journal.append(written.chunks)
        if label is not None:
            self._ranges.append((first, written.end_key))
        self._seen.add(group)
        self._num_images += written.images
        self._num_skipped += written.skipped
        self._dropped += int(n_good > 0 and not keep)
        self._inputs += len(items)
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self._commit()

    def _commit(self) -> None:
        """Make everything written so far durable and record it (see :meth:`packer.writer.journal.Journal.commit`)."""
        self._journal.commit(
            {
                "phase": self._phase,
                "done": self._inputs,
                "sizes": self._journal.sizes,
                "num_images": self._num_images,
                "num_classes": len(self._ranges),
                "num_skipped": self._num_skipped,
                "dropped": self._dropped,
                "outputs": self._outputs,
                "config": self.config,
            }
        )
        self._last_commit = time.monotonic()
        self.done = self._inputs

    # ------------------------------------------------------------------------------------------ closing

    def close(self, report_extra: dict | None = None) -> WriteSummary:
        """Finish: last identity, meta records or shuffle, ``property``, ``report.json``, renames.

        ``report_extra`` (JSON-able) is stored under ``"extra"`` in ``report.json``.
        """
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        finished = self._finished_report is not None
        if not finished:
            if self._phase == "stream":
                if self._cur is not _NO_GROUP:
                    self._finish_group()
                self._phase = "finalize"
                self._commit()
            if self._phase == "finalize":
                self._finalize(report_extra)
            self._rename_outputs()
        self._closed = True
        self._lock.release()
        report = self.report = json.loads((self.out_dir / REPORT_NAME).read_bytes())
        return summary_of(report, self.out_dir, resumed_from=self._resumed_from, already_finished=finished)

    def _finalize(self, report_extra: dict | None) -> None:
        """The finalize phase, redone from its start after a crash: records, ``property``, ``report.json``."""
        outputs = self._finalize_records()
        n_classes = len(self._ranges)
        h, w = self.image_size
        atomic_write(self.out_dir / ("property" + PARTIAL), f"{n_classes},{h},{w}\n".encode())
        outputs["property"] = "property" + PARTIAL
        outputs[REPORT_NAME] = REPORT_NAME + PARTIAL
        atomic_write(self.out_dir / outputs[REPORT_NAME], report_bytes(self._report(list(outputs), report_extra)))
        self._outputs = outputs
        self._phase = "rename"
        self._commit()

    def _finalize_records(self) -> dict[str, str]:
        """Meta records appended (insightface) or a shuffled copy written (flat), all fsynced, the partial files
        closed. Returns each record output's final name -> the file that becomes it."""
        self._journal.drop_tails(("rec", "idx", "crc"))  # meta records of an earlier, interrupted finalize
        names = [*_RECORD_OUTPUTS, *(["train.lst"] if self.write_lst else [])]
        outputs = {name: name + PARTIAL for name in names}
        if self.layout == "insightface":
            tail = records.meta_records(self._num_images, self._ranges, self._journal.sizes["rec"])
            for key, data in tail.items():
                self._journal.write_tail(key, data)
        elif self.shuffle_seed is not None:
            self._write_shuffled()
            outputs = {name: name + SHUFFLED for name in outputs}
        self._journal.sync()
        self._journal.close()
        return outputs

    def _write_shuffled(self) -> None:
        """The flat partials rewritten in :func:`shuffle_order` into ``*.shuffled.partial`` files."""
        journal = self._journal
        journal.flush()
        keys = ["rec", "idx", "crc", *(["lst"] if self.write_lst else [])]
        streamed = {key: journal.read(key) for key in keys if key in ("idx", "lst")}
        records.write_shuffled(
            {"rec": journal.partial("rec"), "lst": journal.partial("lst")},
            streamed,
            {key: self.out_dir / (STREAM[key] + SHUFFLED) for key in keys},
            self._num_images,
            self.shuffle_seed,
        )

    def _report(self, files: list[str], extra: dict | None) -> dict:
        return build_report(
            settings={"layout": self.layout, "label_style": self.label_style, "image_size": self.image_size},
            files=files,
            counts={
                "inputs": self._inputs,
                "images": self._num_images,
                "classes": len(self._ranges),
                "dropped_identities": self._dropped,
            },
            config=self.config,
            skipped_lines=self._journal.read("skipped"),
            notes_lines=self._journal.read("notes"),
            extra=extra,
        )

    def _rename_outputs(self) -> None:
        """The rename phase, redone after a crash: partials to final names (report.json last), leftovers removed,
        then the state file."""
        out = self.out_dir
        for name in OUTPUT_ORDER:  # report.json last: its presence marks a finished dataset
            src = self._outputs.get(name)
            if src is not None and (out / src).exists():
                os.replace(out / src, out / name)
        fsync_dir(out)
        for name in our_names(self.companions):
            if name not in OUTPUT_ORDER and name != STATE_NAME:  # sources are renamed by now: leftovers only
                (out / name).unlink(missing_ok=True)
        fsync_dir(out)
        self._journal.remove_state()
        fsync_dir(out)

    def abort(self) -> None:
        """Stop without finishing; keep everything committed (plus finished identities) for ``resume``."""
        if self._closed:
            return
        try:
            if self._phase == "stream" and not self._journal.broken and self._journal.is_open:
                with contextlib.suppress(OSError):
                    self._commit()
        finally:
            self._journal.close()
            self._closed = True
            self._lock.release()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a failed finish (disk full): keep what is committed, release the folder
            self.abort()
            raise
