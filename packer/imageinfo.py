"""Cheap image sniffing from the first bytes: format (JPEG/PNG) and pixel size, without decoding.

``pack`` stores aligned crops byte-for-byte (as face2rec2 does); this check keeps non-images and photos of the
wrong size (not aligned crops) out of a dataset at the cost of reading a few header bytes.
"""

from __future__ import annotations

import os
import stat
import struct

__all__ = ["NotRegularFileError", "TooBigError", "image_info", "read_regular_file"]

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM stand alone


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i < n:
        if b[i] != 0xFF:
            return None
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = b[i]
        i += 1
        if marker in _NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if i + 2 > n:
            return None
        (seg_len,) = struct.unpack_from(">H", b, i)
        if marker in _SOF:
            if i + 7 > n:
                return None
            h, w = struct.unpack_from(">HH", b, i + 3)
            return (w, h) if w and h else None
        i += seg_len
    return None


def image_info(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` of a JPEG or PNG from its header bytes; None if it is neither or unreadable.

    ``format`` is ``"jpeg"`` or ``"png"``. Only headers are checked: a file cut off after its header passes.
    """
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        return None if size is None else ("jpeg", *size)
    if data[:8] == _PNG_SIG and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack_from(">II", data, 16)
        return ("png", w, h) if w and h else None
    return None


class NotRegularFileError(OSError):
    """The path is a FIFO, a device, a socket or a directory: reading it could block or never end."""


class TooBigError(OSError):
    """The file is larger than the caller's limit; ``size`` is its size in bytes."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"file is {size / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)")
        self.size = size


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; never blocks and never reads without end.

    Checked with ``stat`` first, opened with ``O_NONBLOCK`` (a FIFO without a writer would block ``open``) and
    checked again with ``fstat`` on the opened descriptor, so a path swapped in between cannot slip through. Raises
    :class:`NotRegularFileError`, :class:`TooBigError` or the ``OSError`` of the open/read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # sockets cannot even be opened (ENXIO)
        raise NotRegularFileError("not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError("not a regular file")
        if st.st_size > max_bytes:
            raise TooBigError(st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew since fstat
            raise TooBigError(len(data), max_bytes)
        return data
    finally:
        os.close(fd)
