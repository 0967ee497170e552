"""The image header probe: format, size and EXIF orientation from a file's first bytes, without decoding pixels.

One probe serves every reader of images: both decoders of ``gpu-align run`` (a bad file is rejected with a reason
before it reaches a decoder, so one bad file never aborts a DALI batch) and ``pack`` (crops that are no JPEG/PNG,
cut off, or of the wrong size stay out of the dataset). Torch-free, so the packer can use it.

A failure reason is ``"<category>: <detail>"`` with the category one of :data:`FAILURE_CATEGORIES`.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass

__all__ = [
    "FAILURE_CATEGORIES",
    "ImageError",
    "ImageInfo",
    "NotRegularFileError",
    "TooBigError",
    "failure_category",
    "image_format",
    "probe_image",
    "read_image_file",
    "read_regular_file",
]

# Per-photo pixel budget. Detection costs ~50 bytes per decoded pixel on the CPU (a 100 MP photo took 5 GB), so a
# photo above 40 MP (e.g. 8000×6000) is refused from its header ("too large"): downscale such photos first.
DEFAULT_MAX_PIXELS = 40_000_000

EMPTY = "empty file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED = "unsupported format"
TRUNCATED = "truncated"
TOO_LARGE = "too large"
CORRUPT = "corrupt"
FAILURE_CATEGORIES = (EMPTY, UNREADABLE, NOT_AN_IMAGE, UNSUPPORTED, TRUNCATED, TOO_LARGE, CORRUPT)

# Formats every backend decodes (DALI's nvImageCodec and Pillow agree on these, EXIF orientation included).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def failure_category(reason: str) -> str:
    """The category of a failure reason (``"truncated: ..." -> "truncated"``)."""
    return reason.split(":", 1)[0]


class ImageError(Exception):
    """A file that cannot be read as an image; ``str(e)`` is the failure reason (``"<category>: <detail>"``)."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` learns from a file's header without decoding it."""

    format: str  # one of SUPPORTED_FORMATS
    width: int  # stored size, before EXIF orientation
    height: int
    orientation: int = 1  # EXIF orientation 1..8 (JPEG only; other formats are oriented by Pillow/DALI)
    components: int = 3  # JPEG colour components: 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK (JPEG only)

    @property
    def pixels(self) -> int:
        return self.width * self.height


# Magic bytes of formats recognised but not decoded (the reason names them).
_UNSUPPORTED_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
)


def image_format(data: bytes) -> str | None:
    """``"JPEG" | "PNG" | "WEBP" | "BMP"`` (the decodable formats, :data:`SUPPORTED_FORMATS`) or another name
    from :data:`_UNSUPPORTED_MAGIC` (``"GIF"``, ``"TIFF"``, ...) from the magic bytes; None if unrecognised."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return name
    return None


def _sniff(data: bytes) -> str:
    """Image format from the magic bytes; raises ImageError for empty, unsupported and non-image data."""
    if not data:
        raise ImageError(EMPTY, "0 bytes")
    fmt = image_format(data)
    if fmt in SUPPORTED_FORMATS:
        return fmt
    if fmt is not None:
        raise ImageError(UNSUPPORTED, fmt)
    head = data[:32]
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1").strip()
        raise ImageError(UNSUPPORTED, "AVIF" if brand.startswith("avi") else f"HEIF/ISO media ({brand})")
    if head.startswith(b"\xff\xd8"):
        raise ImageError(CORRUPT, "JPEG start marker without a following segment")
    raise ImageError(NOT_AN_IMAGE, f"unrecognised content, starts with {head[:12]!r}")


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})

def _exif_orientation(tiff: bytes) -> int:
    """EXIF orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent or invalid."""
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, typ = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == 0x0112 and typ in (3, 4):  # SHORT, or LONG (some writers use it; Pillow honours both)
                fmt = order + ("H" if typ == 3 else "I")
                (value,) = struct.unpack(fmt, tiff[entry + 8 : entry + 8 + struct.calcsize(fmt)])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def _probe_jpeg(data: bytes, max_pixels: int) -> ImageInfo:
    """Walk the JPEG segments up to the first scan: size, EXIF orientation, and the truncation check."""
    n = len(data)
    pos = 2
    width = height = components = 0
    arithmetic = False
    orientation = 0  # 0: no EXIF block seen yet (the first one counts)
    while True:
        if pos >= n:
            raise ImageError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        if data[pos] != 0xFF:
            raise ImageError(CORRUPT, f"JPEG marker expected at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ImageError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            continue
        if marker == 0xD9:
            raise ImageError(CORRUPT, "JPEG ends before any image data")
        if pos + 2 > n:
            raise ImageError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        seglen = (data[pos] << 8) | data[pos + 1]
        if seglen < 2:
            raise ImageError(CORRUPT, f"JPEG segment length {seglen} at byte {pos}")
        end = pos + seglen
        if end > n:
            raise ImageError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        if marker in _SOF_MARKERS and seglen >= 8:
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            components = data[pos + 7]
            arithmetic = marker in _ARITHMETIC_SOF
        elif marker == 0xE1 and orientation == 0 and data[pos + 2 : pos + 8] == b"Exif\x00\x00":
            orientation = _exif_orientation(memoryview(data)[pos + 8 : end])
        elif marker == 0xDA:
            break
        pos = end
    if width == 0 or height == 0:
        raise ImageError(CORRUPT, "JPEG has no frame header (or a zero size) before its image data")
    # Entropy-coded data cannot contain FF D9 (0xFF is byte-stuffed), so an end-of-image marker after the first
    # scan means the file is complete; trailing bytes after it are allowed, as libjpeg allows them.
    if data.rfind(b"\xff\xd9", end) < 0:
        raise ImageError(TRUNCATED, f"JPEG has no end-of-image marker after its image data ({n} bytes)")
    # Huffman coding spends at least one bit on every 8×8 block's DC coefficient (full-resolution component):
    # less entropy data than that cannot hold the claimed size (a few hundred bytes claiming 10000×10000 would
    # otherwise be decoded into a 300 MB grey image). Arithmetic coding has no such floor.
    _check_pixels("JPEG", width, height, max_pixels)  # "too large" says more than "truncated"
    min_bytes = ((width + 7) // 8) * ((height + 7) // 8) // 8
    if not arithmetic and n - end < min_bytes:
        raise ImageError(
            TRUNCATED, f"{n - end} bytes of JPEG data cannot hold {width}x{height} (needs at least {min_bytes})"
        )
    return ImageInfo("JPEG", width, height, orientation or 1, components)


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError(TRUNCATED if len(data) < 33 else CORRUPT, "PNG without a valid IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if data.rfind(b"IEND", 33) < 0:
        raise ImageError(TRUNCATED, f"PNG has no IEND chunk ({len(data)} bytes)")
    return ImageInfo("PNG", width, height)


def _probe_pillow(data: bytes, fmt: str) -> ImageInfo:
    """WebP/BMP: size from Pillow's lazy open (header only), plus the container's own length field."""
    from PIL import Image, UnidentifiedImageError

    if fmt == "WEBP" and len(data) < struct.unpack("<I", data[4:8])[0] + 8:
        raise ImageError(TRUNCATED, f"WebP shorter than its RIFF size ({len(data)} bytes)")
    if fmt == "BMP" and len(data) >= 6 and len(data) < struct.unpack("<I", data[2:6])[0]:
        raise ImageError(TRUNCATED, f"BMP shorter than its header's file size ({len(data)} bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise ImageError(TOO_LARGE, str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as e:
        raise ImageError(CORRUPT, f"{fmt} header: {e}") from None
    return ImageInfo(fmt, width, height)


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format, stored size and EXIF orientation from the header bytes, without decoding pixels.

    Raises :class:`ImageError` for empty, non-image, unsupported, truncated, malformed and over-``max_pixels``
    data (the decompression-bomb check happens here, before any decoder allocates the image).
    """
    fmt = _sniff(data)
    if fmt == "JPEG":
        info = _probe_jpeg(data, max_pixels)
    elif fmt == "PNG":
        info = _probe_png(data)
    else:
        info = _probe_pillow(data, fmt)
    _check_pixels(fmt, info.width, info.height, max_pixels)
    return info


def _check_pixels(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(CORRUPT, f"{fmt} with size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            TOO_LARGE, f"{width}x{height} ({width * height / 1e6:.1f} MP) > max_pixels ({max_pixels / 1e6:.1f} MP)"
        )


def read_image_file(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes; ImageError("unreadable: ...") for OS errors and non-regular files (a FIFO, a device,
    a directory: never opened in a way that blocks), "too large" for absurd file sizes."""
    # No supported format stores more than ~4 bytes per pixel (BMP/PNG worst case), so a bigger file is a bomb too.
    max_bytes = 4 * max_pixels + (1 << 20)
    try:
        return read_regular_file(path, max_bytes)
    except NotRegularFileError:
        raise ImageError(UNREADABLE, "not a regular file") from None
    except TooBigError as e:
        raise ImageError(TOO_LARGE, str(e)) from None
    except OSError as e:
        raise ImageError(UNREADABLE, e.strerror or type(e).__name__) from None


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
