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
``<idx>.bak``. The checksum sidecar ``<rec>.crc`` (see ``packer.crcfile``) is written too, unless one is there
that the records do not match: that one is evidence of changed bytes and stays (``verify`` names the records).

``repair`` removes damaged bytes, and records whose bytes differ from an existing ``<rec>.crc``. When the records
form (or formed) the insightface layout, the layout is then rebuilt from the surviving image records (see
:func:`_rebuild_classic`): keys 1..N again, labels contiguous, key 0 and the identity records recomputed,
``property`` updated, so every training reader can read the result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer import crcfile
from packer.errors import UserError
from packer.fsutil import atomic_write, fsync_dir, sync_file
from packer.reader import (
    DatasetPaths,
    image_shape,
    is_meta_record,
    read_index,
    read_property,
    require_recordio,
    resolve_dataset,
)
from packer.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    encode_record,
    pack,
    read_record_at,
    unpack,
)
from packer.recscan import Damage, scan_rec

__all__ = ["KEY_MODES", "ReindexResult", "reindex"]

KEY_MODES = ("auto", "header", "layout", "sequential")


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
    end: list[int] = field(default_factory=list)
    crc: list[int] = field(default_factory=list)  # zlib.crc32 of the record's bytes on disk
    id: list[int] = field(default_factory=list)
    flag: list[int] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    body: list[int] = field(default_factory=list)

    def drop(self, rows: set[int]) -> None:
        for name in self.__dataclass_fields__:
            col = getattr(self, name)
            setattr(self, name, [v for i, v in enumerate(col) if i not in rows])


def _scan(rec: Path, progress: bool) -> tuple[_Scanned, list[Damage], int]:
    s = _Scanned()
    damages: list[Damage] = []
    with open(rec, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        require_recordio(f, rec, size)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=size, unit="B", unit_scale=True, desc="scan", mininterval=0.5)
        for item in scan_rec(f, size, crc=True):
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
            s.end.append(item.end)
            s.crc.append(item.crc)
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
    if len(head) == 32 and head[:4] == MAGIC_BYTES:
        flag, label, rid, _ = struct.unpack("<IfQQ", head[8:])
        what += f" (header id {rid}, flag {flag}" + (f", label {label:g})" if flag == 0 else ")")
    return f"bytes {d.start}..{d.end} ({d.size} bytes): {what}"


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
            sync_file(dst)
        with open(rec, "r+b") as f:
            f.truncate(d.start)
            sync_file(f)
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
        sync_file(dst)
    _replace_keeping_original(rec, tmp, bak)
    kept.append(bak)
    notes.append(f"rewrote {rec.name} without the damaged bytes; the original is kept as {bak.name}")
    return kept


def _replace_keeping_original(rec: Path, tmp: Path, bak: Path) -> None:
    """Put the rewritten ``tmp`` in place of ``rec``, keeping the original as ``bak`` (a hard link where possible)."""
    if bak.exists():
        bak.unlink()
    try:
        os.link(rec, bak)
    except OSError:
        shutil.copy2(rec, bak)
    os.replace(tmp, rec)
    fsync_dir(rec.parent)


def _write_idx(idx: Path, keys: list[int], offsets: list[int]) -> Path | None:
    """Write ``key<TAB>offset`` lines atomically; returns the backup of a previous, different index."""
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True)).encode()
    backup = None
    if idx.exists() and idx.read_bytes() != text:
        backup = idx.with_name(idx.name + ".bak")
        shutil.copy2(idx, backup)
    atomic_write(idx, text)
    return backup


def _sidecar(paths: DatasetPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not paths.crc.is_file():
        return None
    try:
        return crcfile.read_crc(paths.crc)
    except (OSError, crcfile.CrcFileError):
        return None


def _crc_mismatches(s: _Scanned, sidecar) -> list[int]:
    """Rows of ``s`` that start where a sidecar record starts but whose size or CRC differ (changed bytes)."""
    if sidecar is None or not s.offset:
        return []
    starts, sizes, crcs = sidecar
    off, end, crc = (np.asarray(x, np.int64) for x in (s.offset, s.end, s.crc))
    pos = np.minimum(np.searchsorted(starts, off), max(len(starts) - 1, 0))
    if not len(starts):
        return []
    known = starts[pos] == off
    return np.flatnonzero(known & ((starts[pos] + sizes[pos] != end) | (crcs[pos] != crc))).tolist()


def _old_index(idx_path: Path) -> dict[int, int] | None:
    try:
        return dict(read_index(idx_path)) if idx_path.is_file() else None
    except UserError:
        return None


def _is_classic(s: _Scanned, old: dict[int, int] | None) -> bool:
    """Do (or did) the records form the insightface layout? A meta record survives, or the old index had a key 0
    that no surviving image record is, or (no index) list-labelled images without a key 0 among them."""
    flag, body = np.asarray(s.flag), np.asarray(s.body)
    if len(flag) and (is_meta_record(flag, body) & np.isfinite(np.asarray(s.l1))).any():
        return True
    images = (flag >= 0) & ~is_meta_record(flag, body)
    starts = {o for o, keep in zip(s.offset, images.tolist(), strict=True) if keep}
    if old is not None:
        return 0 in old and old[0] > 0 and old[0] not in starts
    ids = np.asarray(s.id)[images]
    return bool(len(ids)) and (flag[images] >= 2).all() and not (ids == 0).any()


def _first_image_size(rec: Path, s: _Scanned, rows: list[int]) -> tuple[int, int]:
    with open(rec, "rb") as f:
        for r in rows[:1]:
            try:
                return image_shape(unpack(read_record_at(f, s.offset[r]))[1])
            except (ValueError, RecordIOError):
                break
    return (112, 112)


def _relabelled(payload: bytes, key: int, label: int) -> bytes:
    """``payload`` with header id ``key`` and class ``label`` (the scalar, or the first of a label list)."""
    buf = bytearray(payload)
    (flag,) = struct.unpack_from("<I", buf, 0)
    struct.pack_into("<f", buf, 24 if flag else 4, float(label))
    struct.pack_into("<Q", buf, 8, key)
    return bytes(buf)


def _rebuild_classic(
    paths: DatasetPaths, idx_path: Path, s: _Scanned, damages: list[Damage], size: int, notes: list[str]
) -> tuple[list[int], list[int], bytes, list[Path]]:
    """Rebuild the insightface layout from the surviving image records of ``paths.rec``.

    Images are grouped by class (then header id, then file order), get keys 1..N and labels 0..K-1 (a class that
    lost every image is gone and the classes after it move down); key 0 ``[N+1, N+1+K]`` and the identity records
    ``[start, end)`` follow, in face2rec2's order. Where the surviving images already are that (a prefix of the
    file, keys and labels unchanged: the usual crash), the file is cut after them (the cut bytes are kept in
    ``<rec>.dropped-<offset>``) and the meta records appended; otherwise a new ``.rec`` is written and the original
    kept as ``<rec>.bak``. ``property`` gets the new class count. Returns keys, offsets, sidecar and backups.
    """
    rec = paths.rec
    flag, body = np.asarray(s.flag), np.asarray(s.body)
    l0, l1 = np.asarray(s.l0, np.float64), np.asarray(s.l1, np.float64)
    meta = is_meta_record(flag, body) & np.isfinite(l1)
    ok_label = (flag >= 0) & np.isfinite(l0) & (l0 >= 0) & (l0 == np.floor(np.nan_to_num(l0)))
    images = np.flatnonzero(~meta & ok_label)
    for r in np.flatnonzero(~meta & ~ok_label):
        what = "unreadable header" if flag[r] < 0 else f"label {l0[r]:g} is not a class"
        notes.append(f"dropped the record at byte {s.offset[r]} (header id {s.id[r]}): {what}")
    ids = np.asarray(s.id, np.int64)
    order = images[np.lexsort((images, ids[images], l0[images]))]
    old_labels = l0[order].astype(np.int64)
    classes, new_labels = np.unique(old_labels, return_inverse=True)
    n, k = len(order), len(classes)
    new_keys = np.arange(1, n + 1, dtype=np.int64)
    # what the old header said, to list what is gone
    header0 = [r for r in np.flatnonzero(meta) if ids[r] == 0 and l0[r] >= 1]
    old_n = int(l0[header0[0]]) - 1 if header0 else None
    old_k = int(l1[header0[0]] - l0[header0[0]]) if header0 else None
    kept_ids = set(ids[order].tolist())
    last = old_n if old_n is not None else int(ids[order].max(initial=0))
    lost = sorted(set(range(1, last + 1)) - kept_ids)
    if old_n is not None and lost:
        notes.append(f"image keys lost: {_short(lost)}")
    elif old_n is None:
        notes.append(
            f"image keys lost: {_short(lost) or 'none'} of 1..{last}; any after key {last} went with the key 0 "
            "header that counted them"
        )
    vanished = sorted(set(range(int(classes.max(initial=-1)) + 1)) - set(classes.tolist()))
    if old_k is not None:
        vanished = sorted(set(range(old_k)) - set(classes.tolist()))
    if vanished:
        notes.append(
            f"classes with no image left: {_short(vanished)}; the classes after each move down, so labels stay "
            f"0..{k - 1}"
        )
    # ranges of the new classes
    bounds = np.flatnonzero(np.diff(new_labels)) + 1
    starts = np.concatenate([[0], bounds]) + 1
    ends = np.concatenate([bounds, [n]]) + 1
    metas = [(0, [float(n + 1), float(n + 1 + k)])]
    metas += [(n + 1 + c, [float(a), float(b)]) for c, (a, b) in enumerate(zip(starts, ends, strict=True))]
    meta_recs = [encode_record(pack(IRHeader(0, label, key, 0), b"")) for key, label in metas]

    off = np.asarray(s.offset, np.int64)
    ends_img = np.asarray(s.end, np.int64)[order]
    in_place = (
        n > 0
        and (new_keys == ids[order]).all()
        and (new_labels == old_labels).all()
        and off[order[0]] == 0
        and (off[order[1:]] == ends_img[:-1]).all()
    )
    keys: list[int] = new_keys.tolist()
    offsets: list[int] = []
    entries: list[bytes] = []
    kept: list[Path] = []
    if in_place:
        cut = int(ends_img[-1])
        offsets = off[order].tolist()
        entries = [struct.pack("<II", int(s.end[r] - s.offset[r]), int(s.crc[r])) for r in order]
        saved = rec.with_name(f"{rec.name}.dropped-{cut}")
        with open(rec, "rb") as src, open(saved, "wb") as dst:
            src.seek(cut)
            shutil.copyfileobj(src, dst)
            sync_file(dst)
        pos = cut
        with open(rec, "r+b") as f:
            f.truncate(cut)
            f.seek(cut)
            for data in meta_recs:
                f.write(data)
            sync_file(f)
        kept.append(saved)
        notes.append(
            f"cut {rec.name} after its last whole image record (byte {cut}); the {size - cut} bytes after it "
            f"(old meta records, damage) are saved in {saved.name}; new key 0 and identity records appended"
        )
    else:
        tmp = rec.with_name(rec.name + ".repair.tmp")
        bak = rec.with_name(rec.name + ".bak")
        pos = 0
        with open(rec, "rb") as src, open(tmp, "wb") as dst:
            for r, key, label in zip(order.tolist(), keys, new_labels.tolist(), strict=True):
                data = encode_record(_relabelled(read_record_at(src, s.offset[r]), key, label))
                dst.write(data)
                offsets.append(pos)
                entries.append(crcfile.entry(data))
                pos += len(data)
            sync_file(dst)
        with open(tmp, "ab") as dst:
            for data in meta_recs:
                dst.write(data)
            sync_file(dst)
        _replace_keeping_original(rec, tmp, bak)
        kept.append(bak)
        notes.append(f"rewrote {rec.name} from its {n} surviving image records; the original is kept as {bak.name}")
    for (key, _), data in zip(metas, meta_recs, strict=True):
        keys.append(key)
        offsets.append(pos)
        entries.append(crcfile.entry(data))
        pos += len(data)
    prop = None
    with contextlib.suppress(UserError):
        prop = read_property(paths.property_file)
    h, w = (prop.height, prop.width) if prop is not None else _first_image_size(rec, s, [])
    if prop is None or prop.num_classes != k:
        atomic_write(paths.property_file, f"{k},{h},{w}\n".encode())
        notes.append(f"wrote {paths.property_file.name}: {k},{h},{w}")
    lst = paths.lst
    if lst.is_file() and (lost or vanished or old_n is None):
        moved = lst.with_name(lst.name + ".bak")
        os.replace(lst, moved)
        notes.append(f"{lst.name} no longer lists the images one per key: moved to {moved.name}")
    notes.append(f"rebuilt the insightface layout: {n} images (keys 1..{n}), {k} identities (keys {n + 1}..{n + k})")
    return keys, offsets, crcfile.HEADER + b"".join(entries), kept


def _short(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


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
        repair: remove damaged bytes (and records whose bytes differ from ``<rec>.crc``) from the ``.rec`` first.
            An insightface layout is then rebuilt from its surviving images (:func:`_rebuild_classic`). Otherwise
            a damaged tail is cut (the cut bytes are kept in ``<rec>.dropped-<offset>``) and damage inside the
            file makes a new ``.rec`` of the whole records (the original is kept as ``<rec>.bak``). Without
            ``repair`` a damaged ``.rec`` is a UserError.
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
    sidecar = _sidecar(paths)
    changed = _crc_mismatches(s, sidecar)
    if changed and repair:
        # bytes that still parse but are not what was written: as damaged as a broken record
        for r in changed:
            damages.append(Damage(s.offset[r], s.end[r], f"bytes differ from {paths.crc.name}", False))
        damages.sort(key=lambda d: d.start)
        s.drop(set(changed))
    old_index = _old_index(idx_path)
    described = [_describe(rec, d) for d in damages]
    if damages and not repair:
        more = f" (and {len(damages) - 1} more damaged spans)" if len(damages) > 1 else ""
        raise UserError(
            f"{rec} is damaged at {described[0]}{more}; rerun with --repair to remove the damaged bytes "
            "and index the whole records"
        )
    old_keys = set(old_index) if old_index is not None else None
    sidecar_bytes: bytes | None = None
    if repair and _is_classic(s, old_index) and (damages or _layout_keys(s) is None):
        notes += [f"dropped {x}" for x in described]
        key_list, offsets, sidecar_bytes, kept = _rebuild_classic(paths, idx_path, s, damages, size, notes)
        mode, why = "layout", "the insightface layout rebuilt from the surviving image records"
    else:
        if damages:
            kept = _repair(rec, damages, size, notes)
            notes[:0] = [f"dropped {x}" for x in described]
            # shift offsets by the bytes removed before each record
            starts = np.asarray([d.start for d in damages])
            sizes = np.cumsum([d.size for d in damages])
            off = np.asarray(s.offset, dtype=np.int64)
            before = np.searchsorted(starts, off, side="right")
            shift = np.where(before > 0, sizes[np.maximum(before - 1, 0)], 0)
            s.offset = (off - shift).tolist()
            s.end = (np.asarray(s.end, dtype=np.int64) - shift).tolist()
        key_list, mode, why = _choose_keys(s, keys)
        offsets = s.offset
        # whole records only, back to back from byte 0 (damage removed): their sizes and CRCs are the sidecar
        sidecar_bytes = crcfile.HEADER + b"".join(
            struct.pack("<II", e - o, c) for o, e, c in zip(s.offset, s.end, s.crc, strict=True)
        )
        if changed:  # no repair: keep the evidence
            sidecar_bytes = None
            notes.append(
                f"{len(changed)} records differ from their checksums in {paths.crc.name} (first at byte "
                f"{s.offset[changed[0]]}): their bytes changed after writing; 'gpu-align verify' lists them, "
                f"--repair drops them. {paths.crc.name} is left as it is"
            )
    backup = _write_idx(idx_path, key_list, offsets)
    if backup is not None:
        kept.append(backup)
        notes.append(f"the previous index differed; it is kept as {backup.name}")
    if sidecar_bytes is not None and (not paths.crc.is_file() or paths.crc.read_bytes() != sidecar_bytes):
        atomic_write(paths.crc, sidecar_bytes)
        notes.append(f"wrote {paths.crc.name} (one CRC-32 per record, for 'gpu-align verify')")
    if old_keys is not None:
        lost = old_keys - set(key_list)
        if lost:
            notes.append(f"{len(lost)} keys of the previous index have no record any more (e.g. {min(lost)})")
    flags, bodies = np.asarray(s.flag), np.asarray(s.body)
    if mode != "layout" or not repair:
        if _layout_keys(s) is None and len(flags) and (flags >= 2).all() and (bodies > 0).all():
            notes.append(
                "no meta records (key 0 header, identity ranges): this looks like a face2rec2-style pack that "
                "stopped before writing them; 'gpu-align reindex --repair' rebuilds them from the images, or "
                "convert the images with 'gpu-align to-flat'"
            )
        elif mode == "sequential" and _layout_keys(s) is not None:
            notes.append(
                "warning: the records form an insightface layout, but sequential keys make key 0 an arbitrary "
                "record; training readers expect key 0 to be the header (use --keys layout)"
            )
    return ReindexResult(rec, idx_path, len(key_list), mode, why, damages, kept, notes)
