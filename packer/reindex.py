"""Rebuild a ``.idx`` by scanning its ``.rec``; optionally repair a damaged ``.rec`` first (``reindex --repair``).

How keys are chosen (``keys=``):

- ``header``: each record's ``header.id``. face2rec2, InsightFace's dataset tools and our DatasetWriter all
  write ``id = key``, so this reproduces their index byte for byte.
- ``layout``: from the insightface layout itself: the meta record ``[N+1, N+1+K]`` is key 0, the other empty
  meta records (identity ranges, sorted by start) are keys N+1..N+K, the images are keys 1..N in file order.
- ``sequential``: 0, 1, 2, ... in file order (right for a flat layout).
- ``auto`` (default): ``header`` when the ids are unique (and the meta header, if any, has id 0), else ``layout``
  when the records form an insightface layout, else ``sequential``.

The index is written atomically (temporary file, fsync, rename); a previous, different index is kept as
``<idx>.bak``.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer.errors import UserError
from packer.reader import resolve_dataset
from packer.recordio import MAGIC, RecordIOError, unpack
from packer.recscan import Damage, scan_rec

__all__ = ["KEY_MODES", "ReindexResult", "reindex"]

KEY_MODES = ("auto", "header", "layout", "sequential")
_MAGIC_BYTES = struct.pack("<I", MAGIC)


@dataclass
class ReindexResult:
    rec: Path
    idx: Path
    records: int
    keys: str  # the key mode used
    why: str  # how it was chosen
    dropped: list[Damage] = field(default_factory=list)  # byte spans removed from the .rec (repair)
    kept: list[Path] = field(default_factory=list)  # backups of what was removed / replaced
    notes: list[str] = field(default_factory=list)


@dataclass
class _Scanned:
    offset: list[int] = field(default_factory=list)
    id: list[int] = field(default_factory=list)
    flag: list[int] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    body: list[int] = field(default_factory=list)


def _scan(rec: Path, progress: bool) -> tuple[_Scanned, list[Damage], int]:
    s = _Scanned()
    damages: list[Damage] = []
    with open(rec, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size and f.read(4) != _MAGIC_BYTES:
            raise UserError(f"{rec} is not a RecordIO file (it does not start with the RecordIO magic)")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=size, unit="B", unit_scale=True, desc="scan", mininterval=0.5)
        for item in scan_rec(f, size):
            if isinstance(item, Damage):
                damages.append(item)
                if bar is not None:
                    bar.update(item.size)
                continue
            if bar is not None:
                bar.update(item.end - item.offset)
            try:
                header, body = unpack(item.payload)
            except RecordIOError:
                header, body = None, b""
            s.offset.append(item.offset)
            s.id.append(-1 if header is None else header.id)
            s.flag.append(-1 if header is None else header.flag)
            if header is None or header.flag == 0:
                s.l0.append(np.nan if header is None else float(header.label))
                s.l1.append(np.nan)
            else:
                s.l0.append(float(header.label[0]))
                s.l1.append(float(header.label[1]) if header.flag > 1 else np.nan)
            s.body.append(len(body))
        if bar is not None:
            bar.close()
    return s, damages, size


def _layout_keys(s: _Scanned) -> list[int] | None:
    """Keys from the insightface layout's structure, or None if the records do not form one."""
    flag, body = np.asarray(s.flag), np.asarray(s.body)
    l0, l1 = np.asarray(s.l0), np.asarray(s.l1)
    meta = (flag >= 2) & (body == 0) & np.isfinite(l1)
    n_img, n_meta = int((~meta).sum()), int(meta.sum())
    cand = np.flatnonzero(meta & (l0 == n_img + 1) & (l1 - l0 == n_meta - 1))
    if len(cand) != 1:
        return None
    keys = np.empty(len(flag), dtype=np.int64)
    keys[~meta] = np.arange(1, n_img + 1)
    ident = np.flatnonzero(meta)
    ident = ident[ident != cand[0]]
    ident = ident[np.argsort(l0[ident], kind="stable")]
    keys[cand[0]] = 0
    keys[ident] = np.arange(n_img + 1, n_img + 1 + len(ident))
    return keys.tolist()


def _choose_keys(s: _Scanned, mode: str) -> tuple[list[int], str, str]:
    ids = s.id
    unique = len(set(ids)) == len(ids) and min(ids, default=0) >= 0
    layout = _layout_keys(s)
    if mode == "header":
        if not unique:
            dup = _first_duplicate(ids)
            raise UserError(
                f"header ids are not unique (id {dup} occurs more than once), so they cannot be the keys: "
                "use --keys layout (insightface layout) or --keys sequential"
            )
        return list(ids), "header", "each record's header id; face2rec2 and InsightFace's tools write id = key"
    if mode == "layout":
        if layout is None:
            raise UserError(
                "the records do not form an insightface layout (no empty meta record [N+1, N+1+K] matching "
                "the counts of image and identity records): use --keys header or --keys sequential"
            )
        return layout, "layout", "key 0 = meta header, images 1..N in file order, identity records N+1..N+K"
    if mode == "sequential":
        return list(range(len(ids))), "sequential", "0..n-1 in file order"
    # auto
    if unique:
        meta_ok = layout is None or ids[layout.index(0)] == 0
        if meta_ok:
            why = "the header ids are unique, so they are the keys; face2rec2 and InsightFace's tools write id = key"
            return list(ids), "header", why
    if layout is not None:
        return layout, "layout", "the header ids are not usable keys; keys follow the insightface layout"
    return list(range(len(ids))), "sequential", "header ids are not unique and there is no insightface header: 0..n-1"


def _first_duplicate(values: list[int]) -> int:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return -1


def _describe(rec: Path, d: Damage) -> str:
    """What a dropped span held, for the report: its size and, if readable, the cut record's header."""
    what = "a partial last record" if d.truncated else "damaged bytes"
    with open(rec, "rb") as f:
        f.seek(d.start)
        head = f.read(8 + 24)
    if len(head) == 32 and head[:4] == _MAGIC_BYTES:
        flag, label, rid, _ = struct.unpack("<IfQQ", head[8:])
        what += f" (header id {rid}, flag {flag}" + (f", label {label:g})" if flag == 0 else ")")
    return f"bytes {d.start}..{d.end} ({d.size} bytes): {what}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _repair(rec: Path, damages: list[Damage], size: int, notes: list[str]) -> list[Path]:
    """Remove the damaged spans from ``rec``; returns the backup paths. Offsets shift by the removed bytes."""
    kept: list[Path] = []
    if len(damages) == 1 and damages[0].end == size:
        # Only a damaged tail (the usual crash): keep the cut bytes beside the file, then truncate in place.
        d = damages[0]
        tail = rec.with_name(f"{rec.name}.dropped-{d.start}")
        with open(rec, "rb") as src, open(tail, "wb") as dst:
            src.seek(d.start)
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        with open(rec, "r+b") as f:
            f.truncate(d.start)
            f.flush()
            os.fsync(f.fileno())
        kept.append(tail)
        notes.append(f"cut {rec.name} to {d.start} bytes; the {d.size} dropped bytes are saved in {tail.name}")
        return kept
    # Damage inside the file: copy the good spans into a new file, keep the original as .bak, swap atomically.
    tmp = rec.with_name(rec.name + ".repair.tmp")
    bak = rec.with_name(rec.name + ".bak")
    with open(rec, "rb") as src, open(tmp, "wb") as dst:
        pos = 0
        for d in [*damages, Damage(size, size, "", False)]:
            src.seek(pos)
            remaining = d.start - pos
            while remaining > 0:
                chunk = src.read(min(remaining, 1 << 24))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
            pos = d.end
        dst.flush()
        os.fsync(dst.fileno())
    if bak.exists():
        bak.unlink()
    try:
        os.link(rec, bak)
    except OSError:
        shutil.copy2(rec, bak)
    os.replace(tmp, rec)
    _fsync_dir(rec.parent)
    kept.append(bak)
    notes.append(f"rewrote {rec.name} without the damaged bytes; the original is kept as {bak.name}")
    return kept


def _write_idx(idx: Path, keys: list[int], offsets: list[int]) -> Path | None:
    """Write ``key<TAB>offset`` lines atomically; returns the backup of a previous, different index."""
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True)).encode()
    backup = None
    if idx.exists() and idx.read_bytes() != text:
        backup = idx.with_name(idx.name + ".bak")
        shutil.copy2(idx, backup)
    tmp = idx.with_name(idx.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, idx)
    _fsync_dir(idx.parent)
    return backup


def reindex(
    path: str | os.PathLike,
    *,
    idx: str | os.PathLike | None = None,
    keys: str = "auto",
    repair: bool = False,
    progress: bool = False,
) -> ReindexResult:
    """Rebuild the index of a ``.rec`` (or of ``DIR/train.rec``) from a scan of the records.

    Args:
        path: the ``.rec``, or a dataset folder.
        idx: where to write the index (default: the ``.rec``'s sibling ``.idx``).
        keys: ``"auto" | "header" | "layout" | "sequential"`` (see the module doc).
        repair: remove damaged bytes from the ``.rec`` first: a damaged tail is cut (the cut bytes are kept in
            ``<rec>.dropped-<offset>``); damage inside the file makes a new ``.rec`` of the whole records (the
            original is kept as ``<rec>.bak``). Without ``repair`` a damaged ``.rec`` is a UserError.
        progress: tqdm bar over the scan.
    """
    if keys not in KEY_MODES:
        raise UserError(f"--keys must be one of {', '.join(KEY_MODES)}, not {keys!r}")
    paths = resolve_dataset(path, need_idx=False)
    rec = paths.rec
    idx_path = Path(idx) if idx is not None else paths.idx
    s, damages, size = _scan(rec, progress)
    if size and not s.offset:
        raise UserError(f"{rec} holds no readable RecordIO record ({damages[0].reason if damages else 'empty'})")
    notes: list[str] = []
    kept: list[Path] = []
    if damages:
        described = [_describe(rec, d) for d in damages]
        if not repair:
            more = f" (and {len(damages) - 1} more damaged spans)" if len(damages) > 1 else ""
            raise UserError(
                f"{rec} is damaged at {described[0]}{more}; rerun with --repair to remove the damaged bytes "
                "and index the whole records"
            )
        kept = _repair(rec, damages, size, notes)
        notes[:0] = [f"dropped {x}" for x in described]
        # shift offsets by the bytes removed before each record
        starts = np.asarray([d.start for d in damages])
        sizes = np.cumsum([d.size for d in damages])
        off = np.asarray(s.offset, dtype=np.int64)
        before = np.searchsorted(starts, off, side="right")
        shift = np.where(before > 0, sizes[np.maximum(before - 1, 0)], 0)
        s.offset = (off - shift).tolist()
    key_list, mode, why = _choose_keys(s, keys)
    old_keys: set[int] | None = None
    if idx_path.exists():
        try:
            old_keys = {int(line.split()[0]) for line in idx_path.read_text(errors="replace").splitlines() if line}
        except (ValueError, IndexError):
            old_keys = None
    backup = _write_idx(idx_path, key_list, s.offset)
    if backup is not None:
        kept.append(backup)
        notes.append(f"the previous index differed; it is kept as {backup.name}")
    if old_keys is not None:
        lost = old_keys - set(key_list)
        if lost:
            notes.append(f"{len(lost)} keys of the previous index have no record any more (e.g. {min(lost)})")
    flags, bodies = np.asarray(s.flag), np.asarray(s.body)
    if _layout_keys(s) is None and len(flags) and (flags >= 2).all() and (bodies > 0).all():
        notes.append(
            "no meta records (key 0 header, identity ranges): this looks like a face2rec2-style pack that stopped "
            "before writing them; rerun that pack with --resume, or convert the images with 'gpu-align to-flat'"
        )
    elif mode == "sequential" and _layout_keys(s) is not None:
        notes.append(
            "warning: the records form an insightface layout, but sequential keys make key 0 an arbitrary record; "
            "training readers expect key 0 to be the header (use --keys layout)"
        )
    return ReindexResult(rec, idx_path, len(key_list), mode, why, damages, kept, notes)
