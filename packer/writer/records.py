"""The bytes a pack writes: one identity's additions to each streamed file, the meta records, the shuffle.

Nothing here touches the pack's state; each function turns inputs into bytes (or rewrites files it is given).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packer import crcfile, recordio
from packer.fsutil import sync_file
from packer.lst import LST_ENCODING, LST_ERRORS, LstEntry, format_lst_line

if TYPE_CHECKING:
    from packer.layout import PackItem

__all__ = ["GroupRecords", "encode_group", "meta_records", "shuffle_order", "write_shuffled"]

_ID_OFFSET = 8  # byte offset of IRHeader.id in a payload ('IfQQ': flag u32, label f32, id u64, id2 u64)


@dataclass
class GroupRecords:
    """What one identity adds to each streamed file (stream key -> bytes, in write order) and its counts."""

    chunks: dict[str, bytes]
    images: int
    skipped: int
    end_key: int  # one past its last image key


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The flat layout's record order: position j holds input record ``order[j]``. (n,) int64."""
    if n == 0:
        return np.zeros(0, np.int64)
    return np.random.RandomState(seed).permutation(n).astype(np.int64)  # legacy RandomState: a frozen stream


def _label_value(label: int, label_style: str) -> float | list[float]:
    return [float(label), 1.0] if label_style == "pair" else float(label)


def _skip_line(item: PackItem, group: str, reason: str) -> str:
    entry = {"path": item.source or (item.lst.path if item.lst else ""), "reason": reason, "group": group}
    return json.dumps(entry) + "\n"


def _lst_line(item: PackItem, group: str, key: int, label: int) -> str:
    """``train.lst`` line of an image stored under ``key``: its own entry (or ``1, source, 0``) with ``label``."""
    e = item.lst if item.lst is not None else LstEntry(1, item.source or f"{group}/{key}", 0)
    return format_lst_line(e.with_label(label)) + "\n"


def encode_group(
    items: Sequence[PackItem],
    group: str,
    *,
    label: int | None,
    first_key: int,
    offset: int,
    label_style: str,
    write_lst: bool,
    too_few: str,
) -> GroupRecords:
    """Records of ``items`` (one identity, label ``label`` or None = dropped) as keys ``first_key..`` starting at
    byte ``offset`` of the ``.rec``, with their ``.idx``/``.lst``/checksum lines, skip and note lines and the
    identity's ``groups.jsonl`` line. ``too_few``: the skip reason of images of a dropped identity."""
    recs: list[bytes] = []
    crcs: list[bytes] = []
    idx: list[str] = []
    lsts: list[str] = []
    skipped: list[str] = []
    notes = [json.dumps({"path": it.source, "group": group, **it.note}) + "\n" for it in items if it.note]
    key = start = first_key
    label_value = None if label is None else _label_value(label, label_style)
    for it in items:
        if it.body is None or label is None:
            skipped.append(_skip_line(it, group, (it.skip_reason or "no image") if it.body is None else too_few))
            continue
        rec = recordio.encode_record(recordio.pack(recordio.IRHeader(0, label_value, key, 0), it.body))
        recs.append(rec)
        crcs.append(crcfile.entry(rec))
        idx.append(f"{key}\t{offset}\n")
        offset += len(rec)
        if write_lst:
            lsts.append(_lst_line(it, group, key, label))
        key += 1
    line = {"group": group, "label": label, "start": start, "end": key, "inputs": len(items)}
    chunks = {"rec": b"".join(recs), "idx": "".join(idx).encode(), "crc": b"".join(crcs)}
    if write_lst:
        chunks["lst"] = "".join(lsts).encode(LST_ENCODING, LST_ERRORS)
    chunks["skipped"] = "".join(skipped).encode()
    chunks["notes"] = "".join(notes).encode()
    chunks["groups"] = (json.dumps(line) + "\n").encode()
    return GroupRecords(chunks, images=len(recs), skipped=len(skipped), end_key=key)


def meta_records(num_images: int, ranges: Sequence[tuple[int, int]], offset: int) -> dict[str, bytes]:
    """face2rec2's tail: key 0 ``[N+1, N+1+K]``, then identity records ``[start, end)`` with keys N+1..N+K.

    Returns the bytes to append to the ``rec``, ``crc`` and ``idx`` streams, the first record at byte ``offset``.
    """
    n, k = num_images, len(ranges)
    metas = [(0, [float(n + 1), float(n + 1 + k)])]
    metas += [(n + 1 + i, [float(s), float(e)]) for i, (s, e) in enumerate(ranges)]
    recs, crcs, lines = [], [], []
    for key, label in metas:
        data = recordio.encode_record(recordio.pack(recordio.IRHeader(0, label, key, 0), b""))
        recs.append(data)
        crcs.append(crcfile.entry(data))
        lines.append(f"{key}\t{offset}\n")
        offset += len(data)
    return {"rec": b"".join(recs), "crc": b"".join(crcs), "idx": "".join(lines).encode()}


def _idx_offsets(idx: bytes, n: int) -> np.ndarray:
    offsets = np.zeros(n, np.int64)
    for i, line in enumerate(idx.splitlines()):
        offsets[i] = int(line.split(b"\t")[1])
    return offsets


def _line_starts(text: bytes, n: int) -> np.ndarray:
    starts = np.zeros(n, np.int64)
    lens = [len(line) for line in text.splitlines(keepends=True)]
    starts[1:] = np.cumsum(lens)[:-1] if n else []
    return starts


def write_shuffled(
    src: Mapping[str, Path], streamed: Mapping[str, bytes], dst: Mapping[str, Path], n: int, seed: int
) -> None:
    """Write the ``n`` streamed flat records in :func:`shuffle_order` into new files; keys (and header ids)
    become the new positions.

    ``src``: the partial ``rec`` (and ``lst``) files; ``streamed``: the streamed ``idx`` (and ``lst``) bytes;
    ``dst``: the ``rec``, ``idx``, ``crc`` (and ``lst``) files to write (fsynced). Without ``lst`` in ``dst``
    no ``.lst`` is written.
    """
    offsets = _idx_offsets(streamed["idx"], n)
    with_lst = "lst" in dst
    lst_starts = _line_starts(streamed["lst"], n) if with_lst else np.zeros(n, np.int64)
    with contextlib.ExitStack() as stack:
        src_rec = stack.enter_context(open(src["rec"], "rb"))
        out: dict[str, Any] = {key: stack.enter_context(open(path, "wb")) for key, path in dst.items()}
        src_lst = stack.enter_context(open(src["lst"], "rb")) if with_lst else None
        out["crc"].write(crcfile.HEADER)
        pos = 0
        for j, i in enumerate(shuffle_order(n, seed).tolist()):
            payload = bytearray(recordio.read_record_at(src_rec, int(offsets[i])))
            struct.pack_into("<Q", payload, _ID_OFFSET, j)  # IRHeader.id = key
            data = recordio.encode_record(payload)
            out["rec"].write(data)
            out["crc"].write(crcfile.entry(data))
            out["idx"].write(f"{j}\t{pos}\n".encode())
            pos += len(data)
            if src_lst is not None:
                src_lst.seek(int(lst_starts[i]))
                out["lst"].write(src_lst.readline())
        for f in out.values():
            sync_file(f)
