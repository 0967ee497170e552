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
from pathlib import Path
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

from gpu_align import photos


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
