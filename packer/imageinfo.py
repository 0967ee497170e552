"""Cheap image sniffing from the first bytes: format (JPEG/PNG) and pixel size, without decoding.

``pack`` stores aligned crops byte-for-byte (as face2rec2 does); this check keeps non-images and photos of the
wrong size (not aligned crops) out of a dataset at the cost of reading a few header bytes.
"""

from __future__ import annotations

import struct

__all__ = ["image_info"]

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
