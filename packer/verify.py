"""Integrity checks of a RecordIO face dataset: structure, index, layout, labels, property, images, checksums.

:func:`verify_dataset` (``gpu-align verify``): one sequential pass over the ``.rec`` (damage-tolerant, see
``packer.recscan``) collects every record's header (and, when ``train.rec.crc`` exists, its CRC-32); image bodies
are decoded on a thread pool meanwhile. The checks then run vectorised over the collected arrays.

:func:`validate_index` (what ``merge``, ``to-flat`` and ``unpack`` run first): the same index, layout and label
rules, from the ``.idx`` and one header read per key instead of a scan (bytes no key covers are reported too), so it
costs what reading the labels costs. :func:`check_index_or_refuse` turns its problems into one error line.

The report keeps the first ``max_problems`` problems in detail (key, byte offset) and counts all of them by kind.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer import crcfile
from packer.dataset_rules import header_labels, insightface_key_ranges, is_meta_record, meta_label_ok, style_of_flags
from packer.errors import UserError
from packer.reader import (
    DatasetPaths,
    Property,
    decode_image,
    image_shape,
    iter_index,
    read_head_span,
    read_property,
    require_recordio,
    resolve_dataset,
)
from packer.recordio import RecordIOError, unpack
from packer.recscan import Damage, scan_rec

__all__ = [
    "PROBLEM_KINDS",
    "TOOL_BLOCKING",
    "Problem",
    "VerifyReport",
    "check_index_or_refuse",
    "validate_index",
    "verify_dataset",
]

# kind -> what it means (printed with the counts)
PROBLEM_KINDS = {
    "truncated": "the .rec ends inside a record",
    "damaged": "bytes in the .rec that hold no whole record",
    "bad-record": "a record too short for its header",
    "index-line": ".idx line mxnet's reader rejects (malformed, blank, or not tab-separated)",
    "duplicate-key": "a key listed more than once in the .idx",
    "duplicate-offset": "several keys pointing at one record",
    "offset-past-end": ".idx offset at or past the end of the .rec",
    "offset-damaged": ".idx offset inside damaged bytes",
    "offset-not-record": ".idx offset that is not the start of a record",
    "unindexed": "record (or bytes) of the .rec that no .idx key covers",
    "missing-key": "key the layout needs but the .idx lacks",
    "extra-key": "key outside the layout's key ranges",
    "header": "key 0 header record wrong",
    "identity-record": "identity record without a [start, end) label",
    "identity-range": "identity ranges not contiguous / not covering 1..N",
    "label": "image label not a non-negative integer, or >= num_classes",
    "label-mismatch": "image label differs from its identity range's class",
    "label-style": "scalar and list labels mixed in one dataset",
    "property": "property file missing fields or disagreeing with the data",
    "empty-image": "image record without image bytes",
    "decode": "image bytes that do not decode",
    "image-size": "image size differs from the property / the other images",
    "checksum": "record bytes differ from their checksum in the .rec.crc sidecar (changed after writing)",
    "checksum-file": ".rec.crc sidecar unreadable or describing another .rec",
}
# What merge / to-flat / unpack refuse to read (unless --force): everything validate_index finds except the
# property file (they rewrite it) and mixed label styles (merge reads both and says so).
TOOL_BLOCKING = frozenset(PROBLEM_KINDS) - {"property", "label-style"}


@dataclass(frozen=True)
class Problem:
    kind: str  # a key of PROBLEM_KINDS
    message: str
    key: int | None = None
    offset: int | None = None


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`. ``ok`` is True when there are no problems (warnings do not count)."""

    rec: Path
    idx: Path
    rec_bytes: int = 0
    layout: str = "unknown"  # "insightface" | "flat" | "unknown" (key 0 unreadable)
    label_style: str = "none"  # "scalar" | "pair" | "mixed" | "none"
    num_records: int = 0
    num_images: int = 0
    num_classes: int = 0
    decoded: bool = True
    image_sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> count
    problems: list[Problem] = field(default_factory=list)  # the first max_problems
    counts: Counter = field(default_factory=Counter)  # kind -> number of problems
    warnings: list[str] = field(default_factory=list)
    max_problems: int = 20

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, message: str, key: int | None = None, offset: int | None = None) -> None:
        self.counts[kind] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(kind, message, key, offset))

    def as_dict(self) -> dict:
        return {
            "rec": str(self.rec),
            "idx": str(self.idx),
            "ok": self.ok,
            "rec_bytes": self.rec_bytes,
            "layout": self.layout,
            "label_style": self.label_style,
            "num_records": self.num_records,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "decoded": self.decoded,
            "image_sizes": self.image_sizes,
            "problem_count": self.total,
            "counts": dict(self.counts),
            "problems": [p.__dict__ for p in self.problems],
            "warnings": self.warnings,
        }



def _id_key(header_id: int) -> int:
    """A header's ``id`` as a key column (int64): an id of 2**63 or more (damaged bytes; mxnet's keys are signed)
    is -1, a key no record has, so it is reported as pointing nowhere instead of stopping the check."""
    return header_id if header_id < 1 << 63 else -1

def _parse_index(path: Path, rep: VerifyReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keys, offsets, line numbers of the well-formed .idx lines (int64 arrays); bad lines become problems."""
    keys, offsets, lines = array("q"), array("q"), array("q")
    for lineno, entry, problem in iter_index(path):
        if problem is not None:
            rep.add("index-line", f"{path.name}:{lineno}: {problem}")
        if entry is None:
            continue
        keys.append(entry[0])
        offsets.append(entry[1])
        lines.append(lineno)
    return (np.frombuffer(keys, np.int64), np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64))


_Checked = tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]  # offsets (n,), (h, w) (n, 2) or -1, failures


def _check_images(batch: list[tuple[int, bytes]], decode: bool) -> _Checked:
    """Image size per body (``-1, -1`` on failure) and the failure reasons; runs on a worker thread."""
    offsets = np.fromiter((o for o, _ in batch), np.int64, len(batch))
    shapes = np.full((len(batch), 2), -1, np.int64)
    failures: list[tuple[int, str]] = []
    for i, (offset, body) in enumerate(batch):
        try:
            shapes[i] = decode_image(body).shape[:2] if decode else image_shape(body)
        except (ValueError, OSError) as e:
            failures.append((offset, str(e) or type(e).__name__))
    return offsets, shapes, failures


class _ImageChecker:
    """Feeds image bodies to a thread pool in batches; bounded in flight so memory stays small."""

    def __init__(self, decode: bool, workers: int):
        self.decode = decode
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.max_inflight = 2 * max(1, workers)
        self.batch: list[tuple[int, bytes]] = []
        self.inflight: list[Future] = []
        self.results: list[_Checked] = []

    def add(self, offset: int, body: bytes) -> None:
        self.batch.append((offset, body))
        if len(self.batch) >= 128:
            self._submit()

    def _submit(self) -> None:
        if self.batch:
            self.inflight.append(self.pool.submit(_check_images, self.batch, self.decode))
            self.batch = []
        while len(self.inflight) > self.max_inflight:
            self.results.append(self.inflight.pop(0).result())

    def finish(self) -> list[_Checked]:
        self._submit()
        for fut in self.inflight:
            self.results.append(fut.result())
        self.pool.shutdown()
        return self.results


def _start_report(
    path: str | os.PathLike, decode: bool, max_problems: int
) -> tuple[DatasetPaths, VerifyReport, Property | None]:
    """The dataset's files, an empty report for them, and its ``property`` (None, reported, if unreadable)."""
    paths = resolve_dataset(path)
    rep = VerifyReport(rec=paths.rec, idx=paths.idx, decoded=decode, max_problems=max_problems)
    prop: Property | None = None
    try:
        prop = read_property(paths.property_file)
    except UserError as e:
        rep.add("property", str(e))
    return paths, rep, prop


def verify_dataset(
    path: str | os.PathLike,
    *,
    decode: bool = True,
    max_problems: int = 20,
    workers: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Check a dataset (folder, ``.rec`` or ``.idx``) completely; see :data:`PROBLEM_KINDS` for what is checked.

    Args:
        decode: decode every image (strict JPEG decode); False only reads image headers (size, format).
        max_problems: how many problems the report keeps in detail (all are counted).
        workers: decode threads (default: one per CPU, up to 8).
        progress: show a tqdm bar (stderr) over the bytes of the .rec.

    Raises UserError when the files are missing or the .rec is not RecordIO at all.
    """
    paths, rep, prop = _start_report(path, decode, max_problems)
    if prop is None and paths.property_file.name == "property" and not paths.property_file.exists():
        rep.warnings.append(f"no property file in {paths.dir} (old InsightFace training code reads it)")

    idx_keys, idx_offsets, idx_lines = _parse_index(paths.idx, rep)
    # sorted view for offset -> key lookups while scanning
    order = np.argsort(idx_offsets, kind="stable")
    sorted_offsets, sorted_keys = idx_offsets[order], idx_keys[order]

    rec_off, rec_end = array("q"), array("q")
    rec_flag, rec_l0, rec_l1, rec_id, rec_body = array("q"), array("d"), array("d"), array("q"), array("q")
    rec_crc, crc_off, crc_end = array("q"), array("q"), array("q")  # every whole record, parsable or not
    damages: list[Damage] = []
    with_crc = paths.crc.is_file()
    checker = _ImageChecker(decode, workers or min(8, os.cpu_count() or 1))

    with open(paths.rec, "rb") as f:
        size = rep.rec_bytes = os.fstat(f.fileno()).st_size
        require_recordio(f, paths.rec, size)
        bar = _progress(size, progress)
        try:
            for item in scan_rec(f, size, crc=with_crc):
                if isinstance(item, Damage):
                    damages.append(item)
                    bar(item.end - item.start)
                    continue
                bar(item.end - item.offset)
                if with_crc:
                    crc_off.append(item.offset)
                    crc_end.append(item.end)
                    rec_crc.append(item.crc)
                try:
                    header, body = unpack(item.payload)
                except RecordIOError as e:
                    key = _key_at(sorted_offsets, sorted_keys, item.offset)
                    rep.add("bad-record", f"record at byte {item.offset} (key {key}): {e}", key, item.offset)
                    continue
                rec_off.append(item.offset)
                rec_end.append(item.end)
                rec_flag.append(header.flag)
                first, second = header_labels(header)
                rec_l0.append(first)
                rec_l1.append(second)
                rec_id.append(_id_key(header.id))
                rec_body.append(len(body))
                if body:
                    checker.add(item.offset, body)
        finally:
            bar(None)
        results = checker.finish()

    off = np.frombuffer(rec_off, np.int64)
    recs = {
        "off": off,
        "end": np.frombuffer(rec_end, np.int64),
        "key": _keys_at(sorted_offsets, sorted_keys, off),
        "flag": np.frombuffer(rec_flag, np.int64),
        "l0": np.frombuffer(rec_l0, np.float64),
        "l1": np.frombuffer(rec_l1, np.float64),
        "id": np.frombuffer(rec_id, np.int64),
        "body": np.frombuffer(rec_body, np.int64),
    }
    rep.num_records = len(recs["off"])
    if size and not rep.num_records and damages:
        raise UserError(f"{paths.rec} holds no readable RecordIO record: {damages[0].reason}")

    _check_damage(rep, paths.rec.name, damages, recs)
    _check_index_entries(rep, paths.idx.name, idx_keys, idx_offsets, idx_lines)
    _check_index_offsets(rep, paths, idx_keys, idx_offsets, idx_lines, recs, damages, size)
    image_mask = _check_layout(rep, idx_keys, recs, prop)
    _check_labels(rep, recs, image_mask, prop)
    _check_images_results(rep, recs, image_mask, results, prop)
    if with_crc:
        scanned = (np.frombuffer(crc_off, np.int64), np.frombuffer(crc_end, np.int64), np.frombuffer(rec_crc, np.int64))
        _check_crc(rep, paths, scanned, damages, sorted_offsets, sorted_keys, size)
    return rep


def _check_crc(rep: VerifyReport, paths: DatasetPaths, scanned, damages, sorted_offsets, sorted_keys, size) -> None:
    """Every whole record must be one the sidecar describes, with the same bytes; the sidecar must cover the .rec."""
    name = paths.crc.name
    try:
        starts, sizes, crcs = crcfile.read_crc(paths.crc)
    except (OSError, crcfile.CrcFileError) as e:
        rep.add("checksum-file", f"{e}; rewrite it with: gpu-align reindex {paths.rec}")
        return
    total = int(sizes.sum())
    if total != size:
        rep.add(
            "checksum-file",
            f"{name} describes {len(sizes)} records of {total} bytes, but {paths.rec.name} has {size} bytes "
            "(the .rec was cut, extended or replaced after it was written)",
        )
    off, end, crc = scanned
    pos = np.minimum(np.searchsorted(starts, off), max(len(starts) - 1, 0))
    known = (pos < len(starts)) & (starts[pos] == off) if len(starts) else np.zeros(len(off), bool)
    for j in np.flatnonzero(~known | (starts[pos] + sizes[pos] != end) | (crcs[pos] != crc)):
        o, key = int(off[j]), _key_at(sorted_offsets, sorted_keys, int(off[j]))
        who = f"record at byte {o}" + (f" (key {key})" if key >= 0 else "")
        if not known[j]:
            why = f"does not start where a record of {name} starts (records were added, removed or moved)"
        elif starts[pos[j]] + sizes[pos[j]] != end[j]:
            why = f"is {int(end[j]) - o} bytes long, {name} says {int(sizes[pos[j]])}"
        else:
            why = f"has CRC-32 {int(crc[j]):08x}, {name} says {int(crcs[pos[j]]):08x}: its bytes changed after writing"
        rep.add("checksum", f"{who} {why}", key if key >= 0 else None, o)
    # records of the sidecar that no whole record matches and no damage (already reported) explains
    seen = np.isin(starts, off)
    for i in np.flatnonzero(~seen):
        o = int(starts[i])
        if o >= size or any(d.start <= o < d.end for d in damages):
            continue
        rep.add("checksum", f"{name} lists a record at byte {o} that is not there in {paths.rec.name}", offset=o)


def validate_index(path: str | os.PathLike, *, max_problems: int = 20) -> VerifyReport:
    """The index, layout and label checks of :func:`verify_dataset` without scanning the ``.rec``.

    Reads the ``.idx`` and one header per distinct offset (in offset order); byte ranges of the ``.rec`` that no
    indexed record covers are ``unindexed`` problems (an empty ``.idx`` beside a full ``.rec``, lost lines).
    Neither image bodies nor checksums are read: ``verify`` does that.
    """
    paths, rep, prop = _start_report(path, False, max_problems)
    idx_keys, idx_offsets, idx_lines = _parse_index(paths.idx, rep)
    name = paths.idx.name
    _check_index_entries(rep, name, idx_keys, idx_offsets, idx_lines)
    uniq_off, first_line = np.unique(idx_offsets, return_index=True)  # each record once, under its first-listed key
    cols = {c: array("q") for c in ("off", "end", "key", "flag", "id", "body")}
    l0, l1 = array("d"), array("d")
    with open(paths.rec, "rb") as f:
        size = rep.rec_bytes = os.fstat(f.fileno()).st_size
        require_recordio(f, paths.rec, size)
        for o, i in zip(uniq_off.tolist(), first_line.tolist(), strict=True):
            k = int(idx_keys[i])
            where = f"{name}:{int(idx_lines[i])}: key {k} points at byte {o}"
            if o < 0 or o >= size:
                kind, why = ("offset-not-record", "a negative offset") if o < 0 else ("offset-past-end", "")
                rep.add(kind, f"{where}, {why or f'past the end of {paths.rec.name} ({size} bytes)'}", k, o)
                continue
            try:
                header, body_len, end = read_head_span(f, o, size)
            except RecordIOError as e:
                kind = "offset-not-record" if "expected RecordIO magic" in str(e) else "offset-damaged"
                rep.add(kind, f"{where}, where no whole record starts ({_strip_where(str(e))})", k, o)
                continue
            for c, v in (("off", o), ("end", end), ("key", k), ("flag", header.flag), ("id", _id_key(header.id))):
                cols[c].append(v)
            cols["body"].append(body_len)
            first, second = header_labels(header)
            l0.append(first)
            l1.append(second)
    recs = {c: np.frombuffer(v, np.int64) for c, v in cols.items()}
    recs["l0"], recs["l1"] = np.frombuffer(l0, np.float64), np.frombuffer(l1, np.float64)
    rep.num_records = len(recs["off"])
    _check_coverage(rep, paths, recs, size)
    image_mask = _check_layout(rep, idx_keys, recs, prop)
    _check_labels(rep, recs, image_mask, prop)
    return rep


def _check_coverage(rep: VerifyReport, paths: DatasetPaths, recs: dict, size: int) -> None:
    """Indexed records (sorted by offset) must tile the .rec: no bytes outside them, none inside two of them."""
    off, end = recs["off"], recs["end"]
    reach = np.maximum.accumulate(np.concatenate([[0], end]))  # reach[j]: the furthest end before record j
    for j in np.flatnonzero(off != reach[:-1]):
        o, k = int(off[j]), int(recs["key"][j])
        if o < reach[j]:
            rep.add("offset-not-record", f"{paths.idx.name}: key {k} points at byte {o}, inside another record", k, o)
        else:
            _gap(rep, paths, int(reach[j]), o)
    if int(reach[-1]) < size:
        _gap(rep, paths, int(reach[-1]), size)


def _gap(rep: VerifyReport, paths: DatasetPaths, start: int, end: int) -> None:
    rep.add(
        "unindexed",
        f"bytes {start}..{end} of {paths.rec.name} ({end - start} bytes) are covered by no key of {paths.idx.name} "
        "(records missing from the index, or damage)",
        offset=start,
    )


def check_index_or_refuse(path: str | os.PathLike, *, force: bool, verb: str) -> list[str]:
    """Run :func:`validate_index` before a tool reads ``path``; UserError naming the problem, unless ``force``.

    ``verb`` says what the tool does (``"merge"``, ``"convert"``, ``"unpack"``). Returns notes for the user (what
    ``--force`` let through), empty when the index is clean.
    """
    rep = validate_index(path, max_problems=50)
    blocking = {k: n for k, n in rep.counts.items() if k in TOOL_BLOCKING}
    if not blocking:
        return []
    first = next((p.message for p in rep.problems if p.kind in TOOL_BLOCKING), "")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(blocking.items()))
    summary = f"{rep.idx} does not match {rep.rec.name} ({counts}; first: {first})"
    if force:
        return [f"--force: reading it anyway: {summary}"]
    raise UserError(
        f"{summary}. Refusing to {verb} it (images would change class or be lost): see 'gpu-align verify "
        f"{rep.rec.parent}', rebuild the index with 'gpu-align reindex {rep.rec} --repair', or pass --force to "
        f"{verb} it as it is"
    )


def _keys_at(sorted_offsets: np.ndarray, sorted_keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The .idx key of each record offset (the first listed one if several), -1 where none points at it."""
    if not len(sorted_offsets):
        return np.full(len(offsets), -1, np.int64)
    pos = np.minimum(np.searchsorted(sorted_offsets, offsets), len(sorted_offsets) - 1)
    return np.where(sorted_offsets[pos] == offsets, sorted_keys[pos], -1)


def _key_at(sorted_offsets: np.ndarray, sorted_keys: np.ndarray, offset: int) -> int:
    return int(_keys_at(sorted_offsets, sorted_keys, np.asarray([offset], np.int64))[0])


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", mininterval=0.5)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update


def _check_damage(rep: VerifyReport, rec_name: str, damages: list[Damage], recs: dict) -> None:
    for d in damages:
        if d.truncated:
            rep.add(
                "truncated",
                f"{rec_name} is truncated: the record at byte {d.start} is cut short ({_strip_where(d.reason)}); "
                f"the last {d.size} bytes are a partial record (a writer that died mid-write?). "
                f"Repair: gpu-align reindex {rec_name} --repair (or rerun the pack with --resume)",
                offset=d.start,
            )
        else:
            after = int(np.searchsorted(recs["off"], d.end))
            rep.add(
                "damaged",
                f"{rec_name}: bytes {d.start}..{d.end} ({d.size} bytes) hold no whole record "
                f"({_strip_where(d.reason)}); "
                f"{len(recs['off']) - after} whole records follow it. Repair: gpu-align reindex {rec_name} --repair",
                offset=d.start,
            )


def _check_index_entries(rep: VerifyReport, name: str, idx_keys, idx_offsets, idx_lines) -> None:
    """Rules on the .idx alone: each key once, each record under one key."""
    uniq, counts = np.unique(idx_keys, return_counts=True)
    for k in uniq[counts > 1]:
        lines = idx_lines[idx_keys == k]
        rep.add("duplicate-key", f"{name}: key {k} is listed {len(lines)} times (lines {_short(lines)})", int(k))
    ou, oc = np.unique(idx_offsets, return_counts=True)
    for o in ou[oc > 1]:
        ks = idx_keys[idx_offsets == o]
        rep.add("duplicate-offset", f"{name}: keys {_short(ks)} all point at byte {o}", int(ks[0]), int(o))


def _check_index_offsets(rep, paths, idx_keys, idx_offsets, idx_lines, recs, damages, size) -> None:
    """Every .idx offset starts a whole record of the scan; every scanned record is indexed."""
    name = paths.idx.name
    off = recs["off"]
    found = np.isin(idx_offsets, off)
    for i in np.flatnonzero(~found):
        k, o, line = int(idx_keys[i]), int(idx_offsets[i]), int(idx_lines[i])
        where = f"{name}:{line}: key {k} points at byte {o}"
        dmg = next((d for d in damages if d.start <= o < d.end), None)
        if o >= size:
            rep.add("offset-past-end", f"{where}, past the end of {paths.rec.name} ({size} bytes)", k, o)
        elif dmg is not None:
            rep.add("offset-damaged", f"{where}, inside damaged bytes {dmg.start}..{dmg.end}", k, o)
        elif o < 0:
            rep.add("offset-not-record", f"{where}, a negative offset", k, o)
        else:
            j = int(np.searchsorted(off, o, side="right")) - 1
            inside = f"inside the record at byte {int(off[j])}" if j >= 0 else "before the first record"
            rep.add("offset-not-record", f"{where}, which is not the start of a record ({inside})", k, o)

    for j in np.flatnonzero(recs["key"] < 0):
        o = int(off[j])
        label = recs["l0"][j]
        rep.add(
            "unindexed",
            f"record at byte {o} (header id {int(recs['id'][j])}, label {label:g}) is not in {name}; "
            f"rebuild the index with: gpu-align reindex {paths.rec.name}",
            offset=o,
        )


def _check_layout(rep: VerifyReport, idx_keys: np.ndarray, recs: dict, prop: Property | None) -> np.ndarray:
    """Layout checks (key 0, identity ranges, key coverage); returns the mask of records that are images."""
    keys, body = recs["key"], recs["body"]
    zero = np.flatnonzero(keys == 0)
    key_set = np.unique(idx_keys)
    rep.layout = _layout_of(rep, recs, zero, key_set)
    if rep.layout == "unknown":
        return (keys >= 0) & (body > 0)
    if rep.layout == "flat":
        return _check_flat(rep, recs, has_key0=len(zero) > 0)
    return _check_insightface(rep, recs, int(zero[0]), key_set, prop)


def _layout_of(rep: VerifyReport, recs: dict, zero: np.ndarray, key_set: np.ndarray) -> str:
    """``insightface`` (key 0 is the header, see packer.dataset_rules), ``flat`` (key 0 is no meta record, or there
    is none), or ``unknown``: key 0 is a meta record with a broken label, or listed but unreadable (reported)."""
    if len(zero):
        z = zero[0]
        a, b = recs["l0"][z], recs["l1"][z]
        if not is_meta_record(recs["flag"][z], recs["body"][z]):
            return "flat"
        if meta_label_ok(a, b):
            return "insightface"
        rep.add("header", f"key 0 label [{a:g}, {b:g}] is not [N+1, N+1+K] with N, K >= 0", 0, int(recs["off"][z]))
        return "unknown"
    if 0 in key_set:  # its record is unreadable: already reported by the index checks
        rep.add("header", "key 0 (the dataset header in the insightface layout) cannot be read", 0)
        return "unknown"
    return "flat"


def _check_flat(rep: VerifyReport, recs: dict, has_key0: bool) -> np.ndarray:
    """Every indexed record is an image; warns about keys other than 0..N-1 and a layout that lost its key 0."""
    keys, flag, body = recs["key"], recs["flag"], recs["body"]
    images = keys >= 0
    rep.num_images = int(images.sum())
    if not has_key0 and rep.num_images and flag[images].min() >= 2 and (body[images] == 0).any():
        rep.warnings.append("no key 0 header but empty-body records exist (a classic layout that lost key 0?)")
    ks = np.sort(keys[images])
    if len(ks) and not (ks[0] == 0 and ks[-1] == len(ks) - 1):
        rep.warnings.append(f"flat layout keys run {int(ks[0])}..{int(ks[-1])}, not 0..{len(ks) - 1}")
    return images


def _check_insightface(rep: VerifyReport, recs: dict, z: int, key_set: np.ndarray, prop: Property | None) -> np.ndarray:
    """Key coverage, identity records and ranges, labels against the ranges; returns the image mask."""
    keys = recs["key"]
    image_keys, identity_keys = insightface_key_ranges(recs["l0"][z], recs["l1"][z])
    rep.num_images, rep.num_classes = len(image_keys), len(identity_keys)
    _check_key_coverage(rep, key_set, image_keys, identity_keys)
    ident = np.flatnonzero((keys >= identity_keys.start) & (keys < identity_keys.stop))
    ident = ident[np.argsort(keys[ident], kind="stable")]  # identity records, in class order
    ranges_ok = _check_identity_records(rep, recs, ident, identity_keys)
    if prop is not None and prop.num_classes != rep.num_classes:
        rep.add("property", f"property says {prop.num_classes} classes, key 0 says {rep.num_classes} identities")
    images = (keys >= image_keys.start) & (keys < image_keys.stop)
    if ranges_ok and len(ident):
        _check_labels_in_ranges(rep, recs, images, ident)
    elif len(ident):
        rep.warnings.append("image labels were not checked against the identity ranges (unreadable or broken)")
    return images


def _check_key_coverage(rep: VerifyReport, key_set: np.ndarray, image_keys: range, identity_keys: range) -> None:
    """Keys 0..N+K must all be indexed, and nothing else."""
    n, k_end = len(image_keys), identity_keys.stop
    missing = np.setdiff1d(np.arange(0, k_end, dtype=np.int64), key_set)
    if len(missing):
        rep.add(
            "missing-key",
            f"{len(missing)} keys of 0..{k_end - 1} (key 0 says {n} images, {len(identity_keys)} identities) "
            f"are not in the .idx: {_short(missing)}",
            int(missing[0]),
        )
    extra = key_set[(key_set < 0) | (key_set >= k_end)]
    if len(extra):
        rep.add("extra-key", f"{len(extra)} .idx keys outside 0..{k_end - 1}: {_short(extra)}", int(extra[0]))


def _check_identity_records(rep: VerifyReport, recs: dict, ident: np.ndarray, identity_keys: range) -> bool:
    """Each identity record (rows ``ident``, in class order) holds a ``[start, end)`` label; together they are
    complete and the ranges tile the image keys. True when the ranges can be trusted for the label check."""
    keys, flag = recs["key"], recs["flag"]
    bad = ident[(flag[ident] < 2) | np.isnan(recs["l1"][ident])]
    for j in bad:
        rep.add(
            "identity-record",
            f"identity key {int(keys[j])} (class {int(keys[j]) - identity_keys.start}) has flag {int(flag[j])}, "
            "not a [start, end) label",
            int(keys[j]),
            int(recs["off"][j]),
        )
    if len(bad) or len(ident) != len(identity_keys) or len(np.unique(keys[ident])) != len(ident):
        return False
    return _check_identity_ranges(rep, recs, ident, identity_keys.start)


def _check_identity_ranges(rep: VerifyReport, recs: dict, ident: np.ndarray, n_end: int) -> bool:
    """Class c's range starts where class c-1's ends (class 0 at key 1) and is not empty; the last ends at
    ``n_end`` (N+1). True when all of that holds."""
    keys = recs["key"]
    starts, ends = recs["l0"][ident], recs["l1"][ident]
    prev_end = np.concatenate([[1.0], ends[:-1]])
    breaks = np.flatnonzero((starts != prev_end) | (ends <= starts) | (starts != np.floor(starts)))
    for c in breaks:
        s, e, pe = starts[c], ends[c], prev_end[c]
        why = "is empty or inverted" if e <= s else f"starts at {s:g}, expected {pe:g} (where class {c - 1} ends)"
        if c == 0 and s != 1:
            why = f"starts at {s:g}, expected 1 (the first image key)"
        rep.add(
            "identity-range",
            f"identity key {int(keys[ident[c]])} (class {c}): range [{s:g}, {e:g}) {why}",
            int(keys[ident[c]]),
            int(recs["off"][ident[c]]),
        )
    if len(ends) and ends[-1] != n_end:
        rep.add(
            "identity-range",
            f"the last identity range ends at {ends[-1]:g}, but key 0 says images are keys 1..{n_end - 1}",
            int(keys[ident[-1]]),
            int(recs["off"][ident[-1]]),
        )
    return not len(breaks) and (not len(ends) or ends[-1] == n_end)


def _check_labels_in_ranges(rep: VerifyReport, recs: dict, images: np.ndarray, ident: np.ndarray) -> None:
    """Each image's label is the class whose identity range holds its key."""
    keys, l0 = recs["key"], recs["l0"]
    starts = l0[ident]
    img = np.flatnonzero(images)
    expected_cls = np.searchsorted(starts, keys[img], side="right") - 1
    differs = l0[img] != expected_cls
    for j, cls in zip(img[differs], expected_cls[differs], strict=True):
        rep.add(
            "label-mismatch",
            f"image key {int(keys[j])} has label {l0[j]:g}, but its key lies in the range of class "
            f"{int(cls)} [{starts[cls]:g}, {recs['l1'][ident][cls]:g})",
            int(keys[j]),
            int(recs["off"][j]),
        )


def _check_labels(rep: VerifyReport, recs: dict, images: np.ndarray, prop: Property | None) -> None:
    keys, flag, l0, body = recs["key"], recs["flag"], recs["l0"], recs["body"]
    if prop is not None and prop.num_images is not None and prop.num_images != rep.num_images:
        # RecBuilder's second line; training readers ignore it, so a stale count misleads only people
        rep.add("property", f"property's second line says {prop.num_images} images, the dataset has {rep.num_images}")
    idx = np.flatnonzero(images)
    if not len(idx):
        return
    scalar, listed = idx[flag[idx] == 0], idx[flag[idx] > 0]
    rep.label_style = style_of_flags(flag[idx])
    if rep.label_style == "mixed":
        rep.add(
            "label-style",
            f"images with scalar labels: {len(scalar)} (first key {int(keys[scalar[0]])}), with list labels: "
            f"{len(listed)} (first key {int(keys[listed[0]])}); most training readers accept only one style",
            int(keys[listed[0]]),
        )
    if rep.layout == "flat" and len(listed):
        rep.warnings.append("flat layout with list labels: DALI's mxnet reader will return one vector per sample")
    lab = l0[idx]
    bad = idx[(lab < 0) | (lab != np.floor(lab)) | ~np.isfinite(lab)]
    for j in bad:
        rep.add("label", f"image key {int(keys[j])}: label {l0[j]:g} is not a non-negative integer", int(keys[j]))
    good = np.setdiff1d(idx, bad)
    if rep.layout == "flat":
        rep.num_classes = int(l0[good].max()) + 1 if len(good) else 0
        if prop is not None and prop.num_classes != rep.num_classes:
            rep.add(
                "property",
                f"property says {prop.num_classes} classes, the largest image label is {rep.num_classes - 1}",
            )
        used = np.unique(l0[good]).astype(np.int64)
        if len(used) != rep.num_classes:
            rep.warnings.append(f"{rep.num_classes - len(used)} labels in 0..{rep.num_classes - 1} have no image")
    elif rep.num_classes:
        over = good[l0[good] >= rep.num_classes]
        for j in over:
            msg = f"image key {int(keys[j])}: label {l0[j]:g} >= num_classes {rep.num_classes}"
            rep.add("label", msg, int(keys[j]))
    for j in idx[body[idx] == 0]:
        rep.add("empty-image", f"image key {int(keys[j])} has no image bytes", int(keys[j]), int(recs["off"][j]))


def _check_images_results(rep: VerifyReport, recs: dict, images: np.ndarray, results: list[_Checked], prop) -> None:
    off, keys = recs["off"], recs["key"]
    if not results:
        return
    res_off = np.concatenate([r[0] for r in results])
    shapes = np.concatenate([r[1] for r in results])
    j = np.searchsorted(off, res_off)  # every result offset is a record offset
    is_image = images[j]  # bodies on meta records are not images: not our business
    what = "decode" if rep.decoded else "read the header of"
    image_offsets = set(off[images].tolist()) if any(r[2] for r in results) else set()
    for o, reason in (f for r in results for f in r[2]):
        if o in image_offsets:
            key = int(keys[np.searchsorted(off, o)])
            rep.add("decode", f"image key {key} at byte {o}: cannot {what} it: {reason}", key, o)
    ok = is_image & (shapes[:, 0] >= 0)
    sizes, counts = np.unique(shapes[ok], axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rep.image_sizes = {f"{sizes[i][0]}x{sizes[i][1]}": int(counts[i]) for i in order}
    if not len(sizes):
        return
    if prop is not None:
        want, source = np.asarray([prop.height, prop.width]), "the property file"
    else:
        want, source = sizes[order[0]], "most images"
    for i in np.flatnonzero(ok & (shapes != want).any(axis=1)):
        key, o = int(keys[j[i]]), int(res_off[i])
        h, w = shapes[i]
        rep.add("image-size", f"image key {key} is {h}x{w}, {source} says {want[0]}x{want[1]}", key, o)


def _strip_where(reason: str) -> str:
    """'record at byte 12: truncated, ...' -> 'truncated, ...' (the caller already says where)."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and head.startswith("record at byte") else reason


def _short(values, limit: int = 8) -> str:
    vals = [str(int(v)) for v in values[:limit]]
    return ", ".join(vals) + (f", ... ({len(values)} in all)" if len(values) > limit else "")
