"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ...): read, write, and build them from a pairs list.

A ``.bin`` is a pickle of ``(list_of_image_bytes, list_of_bools)``: images in the order a0, b0, a1, b1, ... and
one bool per pair (True = same person). InsightFace loads it with ``pickle.load(f, encoding='bytes')`` (the
``encoding`` is for the Python 2 pickles of the released bins) and decodes each entry with ``mx.image.imdecode``
or ``cv2.imdecode``. We write protocol 4 (Python >= 3.4), images as ``bytes``, the flags as Python bools.

Reading uses a restricted unpickler (only containers, bytes, bools, and numpy arrays), so inspecting an untrusted
``.bin`` cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from packer.errors import UserError
from packer.reader import image_format, image_shape

__all__ = ["PairsEntry", "read_bin", "read_pairs", "write_bin"]

PICKLE_PROTOCOL = 4

PairsEntry = tuple[Path, Path, bool]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("codecs", "encode"),  # protocol-2 pickles of bytes made by Python 3
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a verification .bin")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """``(images, issame)`` of an InsightFace ``.bin``: ``2 * len(issame)`` image byte strings and the pair flags."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            data = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"{p} is not an InsightFace verification .bin (unpickling failed: {e})") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise UserError(f"{p} is not an InsightFace verification .bin (expected a pickled (images, issame) pair)")
    bins, issame = data
    images = [bytes(b.tobytes() if hasattr(b, "tobytes") else b) for b in bins]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise UserError(f"{p}: {len(images)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    return images, flags


def write_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool]) -> None:
    """Write ``(images, issame)`` as an InsightFace ``.bin`` atomically (temporary file, then rename)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    p = Path(path)
    buf = io.BytesIO()
    pickle.dump(([bytes(b) for b in images], [bool(x) for x in issame]), buf, protocol=PICKLE_PROTOCOL)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def read_pairs(path: str | os.PathLike) -> list[PairsEntry]:
    """Parse a pairs list: one ``pathA pathB 0|1`` per line (1 = same person), whitespace or tab separated.

    A line with a tab is split on tabs only (so paths may contain spaces); otherwise on any whitespace. Paths
    are relative to the pairs file's folder (or absolute). Blank lines and ``#`` comments are skipped.
    UserError with ``file:line`` for a malformed line or a missing image.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    base = p.parent
    out: list[PairsEntry] = []
    for lineno, raw in enumerate(p.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [x.strip() for x in line.split("\t")] if "\t" in line else line.split()
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            hint = ""
            if len(fields) in (3, 4) and fields[-1].isdigit() and fields[-2].isdigit():
                hint = " (this looks like LFW's pairs.txt 'name n1 n2' format; list image paths instead)"
            raise UserError(f"{p}:{lineno}: expected 'pathA pathB 0|1', got {line[:80]!r}{hint}")
        a, b = (Path(x) if Path(x).is_absolute() else base / x for x in fields[:2])
        for img in (a, b):
            if not img.is_file():
                raise UserError(f"{p}:{lineno}: image {img} does not exist")
        out.append((a, b, fields[2] == "1"))
    if not out:
        raise UserError(f"{p}: no pairs")
    return out


def load_pair_images(pairs: list[PairsEntry], progress: bool = False) -> tuple[list[bytes], tuple[int, int]]:
    """Read the images of ``pairs`` (a0, b0, a1, b1, ...) as stored bytes; all must be JPEG/PNG of one size.

    Returns the byte strings and their common ``(height, width)``. UserError names the offending file.
    """
    paths = [x for a, b, _ in pairs for x in (a, b)]
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="read pairs", unit="img", mininterval=0.5)
    images: list[bytes] = []
    size: tuple[int, int] | None = None
    first: Path | None = None
    for path in it:
        body = path.read_bytes()
        if image_format(body) not in ("jpeg", "png"):
            raise UserError(f"{path}: not a JPEG or PNG image (InsightFace decodes .bin entries as images)")
        try:
            shape = image_shape(body)
        except ValueError as e:
            raise UserError(f"{path}: cannot read the image: {e}") from None
        if size is None:
            size, first = shape, path
        elif shape != size:
            raise UserError(
                f"{path} is {shape[0]}x{shape[1]} but {first} is {size[0]}x{size[1]}: "
                "a verification set holds aligned crops of one size"
            )
        images.append(body)
    assert size is not None
    return images, size
