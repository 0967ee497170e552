"""Scan a whole ``.rec`` in file order and survive damage: report each damaged span, then find the next record.

``packer.recordio.scan_records`` stops at the first bad byte; ``verify`` and ``reindex --repair`` need to know
everything that is wrong and what can be kept. After a damaged record the scan looks for the next offset where a
whole record starts (magic, first-part continuation flag, parses completely, and is followed by another magic or by
the end of the file), so a false resync inside image data is practically impossible.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from packer.recordio import MAGIC_BYTES, RecordIOError, at_magic, read_record_at

__all__ = ["Damage", "Record", "scan_rec"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """A whole record: ``offset`` of its first magic, ``end`` (offset after its padding), ``payload``; ``crc``:
    ``zlib.crc32`` of its on-disk bytes ``[offset, end)`` when the scan was asked for it (else None)."""

    offset: int
    end: int
    payload: bytes
    crc: int | None = None


@dataclass(frozen=True)
class Damage:
    """Bytes ``[start, end)`` that hold no whole record. ``reason`` is the parse error at ``start``.

    ``truncated``: the span runs to the end of the file and starts with a record magic, i.e. the last record was
    cut short (a writer that died mid-write), as opposed to garbage or a corrupted magic.
    """

    start: int
    end: int
    reason: str
    truncated: bool

    @property
    def size(self) -> int:
        return self.end - self.start


def _valid_record_at(f: BinaryIO, pos: int, size: int) -> int | None:
    """End offset of a whole record starting at ``pos`` that is followed by a magic or the end of file, else None."""
    try:
        read_record_at(f, pos)
    except RecordIOError:
        return None
    end = f.tell()
    if end == size:
        return end
    return end if at_magic(f) else None


def _resync(f: BinaryIO, start: int, size: int) -> int:
    """The first offset >= ``start`` where a whole record starts (see module doc), or ``size`` if there is none."""
    pos = start
    while pos < size:
        f.seek(pos)
        chunk = f.read(_CHUNK + 3)  # 3 extra bytes: a magic across the chunk boundary
        hit = chunk.find(MAGIC_BYTES)
        while hit >= 0:
            cand = pos + hit
            if _valid_record_at(f, cand, size) is not None:
                return cand
            hit = chunk.find(MAGIC_BYTES, hit + 1)
        pos += _CHUNK
    return size


def scan_rec(f: BinaryIO, size: int, start: int = 0, *, crc: bool = False) -> Iterator[Record | Damage]:
    """Every whole record and every damaged span of the open ``.rec`` ``f`` (``size`` bytes), in file order.

    Records come as :class:`Record`; bytes that are not part of a whole record come as :class:`Damage`, after
    which the scan resumes at the next whole record (or ends with a Damage that runs to ``size``). With ``crc``
    each Record carries the CRC-32 of its bytes on disk (read again from the page cache: padding included).
    """
    offset = start
    while offset < size:
        try:
            payload = read_record_at(f, offset)
        except RecordIOError as e:
            f.seek(offset)
            starts_with_magic = at_magic(f)
            nxt = _resync(f, offset + 1, size)
            yield Damage(offset, nxt, str(e), truncated=nxt == size and starts_with_magic)
            offset = nxt
            continue
        end = f.tell()
        checksum = None
        if crc:
            f.seek(offset)
            checksum = zlib.crc32(f.read(end - offset))
        yield Record(offset, end, payload, checksum)
        offset = end
