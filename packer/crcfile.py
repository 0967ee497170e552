"""``train.rec.crc``: one CRC-32 per record of a ``.rec``, so that ``verify`` catches any changed byte.

RecordIO has no checksum: a flipped byte inside a JPEG, a header label or the padding still parses. Every gpu-align
writer puts this sidecar beside the ``.rec``; mxnet, DALI and InsightFace's readers never look at it.

Format (little-endian): the 16-byte header ``b"RECCRC32"``, u32 version (1), u32 reserved (0); then one 8-byte
entry per record in file order: u32 ``size`` (the record's bytes on disk: part headers, data, padding) and u32
``crc`` (``zlib.crc32`` of those bytes: the CRC-32 of gzip and PNG). Record i spans ``[sum(size[:i]),
sum(size[:i+1]))`` of the ``.rec``, so the sizes add up to the ``.rec``'s length.

Why ``zlib.crc32`` and not CRC-32C: it is in the standard library (no compiled dependency for ``packer``), runs at
memory speed for 8 KB records (see benchmarks/RESULTS.md), and any CRC-32 detects every error burst of up to 32
bits, so every single changed byte, whatever the record's length.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["CRC_SUFFIX", "HEADER", "CrcFileError", "crc_path", "entry", "read_crc", "span_entries"]

CRC_SUFFIX = ".crc"
_MAGIC = b"RECCRC32"
_VERSION = 1
HEADER = _MAGIC + struct.pack("<II", _VERSION, 0)
_ENTRY = struct.Struct("<II")
_ENTRY_DTYPE = np.dtype([("size", "<u4"), ("crc", "<u4")])


class CrcFileError(ValueError):
    """The sidecar is not a valid ``.rec.crc`` file (the message says why)."""


def crc_path(rec: str | os.PathLike) -> Path:
    """The sidecar of ``rec``: ``train.rec`` -> ``train.rec.crc``."""
    rec = Path(rec)
    return rec.with_name(rec.name + CRC_SUFFIX)


def entry(record: bytes) -> bytes:
    """The sidecar entry of one record, given its on-disk bytes (``recordio.encode_record``'s output)."""
    return _ENTRY.pack(len(record), zlib.crc32(record))


def read_crc(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, sizes, crcs)`` of every record the sidecar describes, as (n,) int64 arrays (starts: byte offsets).

    Raises :class:`CrcFileError` for a wrong header or a length that is not whole entries.
    """
    data = Path(path).read_bytes()
    if data[: len(_MAGIC)] != _MAGIC:
        raise CrcFileError(f"{path}: not a gpu-align checksum file (no {_MAGIC.decode()} header)")
    if len(data) < len(HEADER):
        raise CrcFileError(f"{path}: header cut short ({len(data)} bytes)")
    (version,) = struct.unpack_from("<I", data, len(_MAGIC))
    if version != _VERSION:
        raise CrcFileError(f"{path}: checksum format version {version}, this gpu-align reads version {_VERSION}")
    body = len(data) - len(HEADER)
    if body % _ENTRY.size:
        raise CrcFileError(f"{path}: {body} bytes of entries is not a whole number of {_ENTRY.size}-byte entries")
    entries = np.frombuffer(data, _ENTRY_DTYPE, offset=len(HEADER))
    sizes = entries["size"].astype(np.int64)
    starts = np.zeros(len(sizes), np.int64)
    if len(sizes):
        starts[1:] = np.cumsum(sizes)[:-1]
    return starts, sizes, entries["crc"].astype(np.int64)


def span_entries(f: BinaryIO, spans: list[tuple[int, int]]) -> bytes:
    """Sidecar entries of the records at byte ``[start, end)`` spans of the open ``.rec`` ``f``, in that order."""
    out = []
    for start, end in spans:
        f.seek(start)
        out.append(entry(f.read(end - start)))
    return b"".join(out)
