"""Bad and edge-case input files for decode and end-to-end tests, written to disk from real photos.

``make_bad_files(dir)`` -> ``{name: BadFile(path, expected)}``; ``expected`` is ``"ok"`` (decodes, to the
``(H, W)`` in :data:`SHAPES`) or the failure category the decoder reports (``gpu_align.decode.FAILURE_CATEGORIES``:
"empty file", "truncated", "not an image", "unsupported format", "too large", "unreadable", "corrupt").
Every "ok" file shows the astronaut's face upright (after EXIF orientation), so a detector finds it.

GIF decision: GIFs are not decoded. ``packer.scan.scan_folder`` skips ``.gif`` files (not in its extensions) and
the decoder rejects GIF content (also when named ``.jpg`` or listed in a ``.lst``) as "unsupported format".
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

from gpu_align.demo import photos


class BadFile(NamedTuple):
    path: Path
    expected: str  # "ok" or a failure category


HUGE = (4000, 6000)  # (H, W) of the huge JPEG: 24 megapixels
FACE = (512, 512)  # the astronaut photo
ROTATED = (512, 384)  # the EXIF-rotated file, decoded upright: a portrait crop of the astronaut
# decoded (H, W) of the files expected to decode
SHAPES = {
    "png": FACE,
    "png_named_jpg": FACE,
    "grayscale_jpeg": FACE,
    "cmyk_jpeg": FACE,
    "progressive_jpeg": FACE,
    "trailing_bytes_jpeg": FACE,
    "unicode_name": FACE,
    "exif_rotated": ROTATED,
    "exif_long_rotated": ROTATED,
    "huge_jpeg": HUGE,
    "no_permission": FACE,  # only when running as root (see make_bad_files)
}


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


def _pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _with_sof_field(jpeg: bytes, offset: int, value: bytes) -> bytes:
    """Patch bytes at ``offset`` inside the baseline frame header (after the marker and length)."""
    sof = jpeg.index(b"\xff\xc0") + 4
    return jpeg[: sof + offset] + value + jpeg[sof + offset + len(value) :]


def zeroed_scan_jpeg(jpeg: bytes, n: int = 2000) -> bytes:
    """``jpeg`` with ``n`` bytes in the middle of its entropy-coded data zeroed: header and end marker intact,
    libjpeg-turbo recovers with a "Corrupt JPEG data" warning and would return a garbled image."""
    sos = jpeg.index(b"\xff\xda")
    mid = (sos + len(jpeg)) // 2
    return jpeg[:mid] + bytes(n) + jpeg[mid + n :]


def tiny_jpeg_claiming(width: int, height: int) -> bytes:
    """A complete 8×8 grey JPEG whose frame header claims ``width``×``height``: a few hundred bytes that would
    decode into a ``width * height * 3`` byte image (libjpeg fills the missing data with grey)."""
    tiny = simplejpeg.encode_jpeg(np.zeros((8, 8, 1), np.uint8), quality=50, colorspace="GRAY")
    return _with_sof_field(tiny, 1, height.to_bytes(2, "big") + width.to_bytes(2, "big"))


def exif_long_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an EXIF APP1 block whose orientation tag (0x0112) has type LONG (4) instead of SHORT (3):
    legal TIFF, written by some tools, and honoured by Pillow's ``exif_transpose``."""
    ifd = struct.pack("<HHHII", 1, 0x0112, 4, 1, orientation) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def black_png(width: int, height: int) -> bytes:
    """An all-black ``width``×``height`` grey PNG: ~1 KB per megapixel on disk, 3 bytes per pixel decoded."""
    return _pil_bytes(Image.new("L", (width, height)), "PNG", optimize=True)


def huge_gradient_jpeg(face: np.ndarray, shape: tuple[int, int] = HUGE) -> bytes:
    """A ``shape`` JPEG: smooth colour gradient with ``face`` pasted in the middle (generated in well under 1 s)."""
    h, w = shape
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (0.6 * y + 0.4 * x).astype(np.uint8)
    img[..., 1] = (0.5 * x + 40).astype(np.uint8)
    img[..., 2] = (255 - 0.7 * y).astype(np.uint8)
    fh, fw = face.shape[:2]
    top, left = (h - fh) // 2, (w - fw) // 2
    img[top : top + fh, left : left + fw] = face
    return _jpeg(img, quality=85)


def make_bad_files(dir: str | os.PathLike, *, huge: bool = True, fifo: bool = False) -> dict[str, BadFile]:
    """Write the edge-case files into ``dir`` (created if needed); ``huge=False`` skips the 24 MP JPEG.

    ``fifo=True`` adds a named pipe called ``named_pipe.jpg`` (off by default: copying the folder with
    ``shutil.copytree`` or reading every file would block on it).
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    face = photos.load_rgb("astronaut")  # (512, 512, 3)
    good = _jpeg(face)
    out: dict[str, BadFile] = {}

    def put(name: str, filename: str, data: bytes | str, expected: str) -> Path:
        p = d / filename
        if isinstance(data, str):
            p.write_text(data, encoding="utf-8")
        else:
            p.write_bytes(data)
        out[name] = BadFile(p, expected)
        return p

    put("zero_byte", "zero_byte.jpg", b"", "empty file")
    put("truncated_jpeg", "truncated.jpg", good[: len(good) * 2 // 3], "truncated")
    put("text_as_jpg", "notes.jpg", "This is a text file, not a photo.\n" * 20, "not an image")
    put("gif", "animation.gif", _pil_bytes(Image.fromarray(face).convert("P"), "GIF"), "unsupported format")
    # header and end marker intact, but bogus sampling factors in the frame header: every decoder fails
    put("corrupt_jpeg", "corrupt.jpg", _with_sof_field(good, 7, b"\x03"), "corrupt")
    # a valid JPEG whose header claims 65000×65000 (4.2 gigapixels): rejected from the header, never decoded
    put("bomb_jpeg", "bomb.jpg", _with_sof_field(good, 1, b"\xfd\xe8\xfd\xe8"), "too large")
    # entropy data damaged where libjpeg-turbo only warns: "corrupt" on every backend, never a garbled photo
    put("corrupt_data_jpeg", "corrupt_data.jpg", zeroed_scan_jpeg(good), "corrupt")
    # a few hundred bytes claiming 6000×6000 (36 MP: within the pixel budget, a 108 MB grey image otherwise)
    put("tiny_bomb_jpeg", "tiny_bomb.jpg", tiny_jpeg_claiming(6000, 6000), "truncated")
    missing = d / "missing_target.jpg"
    link = d / "dangling_link.jpg"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(missing)
    out["dangling_link"] = BadFile(link, "unreadable")

    if fifo:  # opening a FIFO blocks until a writer comes: it must be rejected unopened
        pipe = d / "named_pipe.jpg"
        if not pipe.exists():
            os.mkfifo(pipe)
        out["fifo"] = BadFile(pipe, "unreadable")

    put("png", "face.png", _pil_bytes(Image.fromarray(face), "PNG"), "ok")
    put("png_named_jpg", "really_a_png.jpg", _pil_bytes(Image.fromarray(face), "PNG"), "ok")
    put("grayscale_jpeg", "grayscale.jpg", _pil_bytes(Image.fromarray(face).convert("L"), "JPEG", quality=90), "ok")
    put("cmyk_jpeg", "cmyk.jpg", _pil_bytes(Image.fromarray(face).convert("CMYK"), "JPEG", quality=90), "ok")
    put("progressive_jpeg", "progressive.jpg", _pil_bytes(Image.fromarray(face), "JPEG", progressive=True), "ok")
    put("trailing_bytes_jpeg", "trailing.jpg", good + b"\x00" * 64 + b"camera trailer", "ok")
    put("unicode_name", "Zoë Ødegård 日本語.jpg", good, "ok")
    # stored rotated 90° counter-clockwise with EXIF orientation 6 ("rotate 90° clockwise to display"):
    # shown upright only when orientation is applied
    portrait = face[:, 64:448]  # (512, 384): a non-square crop, so a wrong rotation also changes the shape
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(portrait, k=1)))
    put("exif_rotated", "exif_rotated.jpg", _pil_bytes(stored, "JPEG", quality=92, exif=exif), "ok")
    put("exif_long_rotated", "exif_long.jpg", exif_long_orientation(_pil_bytes(stored, "JPEG", quality=92), 6), "ok")
    if huge:
        put("huge_jpeg", "huge_6000x4000.jpg", huge_gradient_jpeg(face), "ok")

    # no read permission: unreadable for ordinary users; root reads it anyway, so then it decodes
    p = put("no_permission", "no_permission.jpg", good, "unreadable")
    p.chmod(0)
    try:
        with open(p, "rb"):
            out["no_permission"] = BadFile(p, "ok")
    except PermissionError:
        pass
    return out
