"""Read InsightFace RecordIO datasets: ``DatasetReader`` plus the small helpers the dataset tools share.

A dataset is ``DIR/train.rec`` + ``DIR/train.idx`` (+ ``DIR/property``), or any ``X.rec`` with its sibling
``X.idx``. Two layouts exist:

- ``insightface`` (face2rec2 / InsightFace's released recs): key 0 is a meta record (flag >= 2, empty body, label
  ``[N+1, N+1+K]``), image keys are ``1..N``, identity records ``N+1..N+K`` hold ``[first_key, end_key)``.
- ``flat`` (for DALI): every record is an image, normally keys ``0..N-1``; no meta records.

Image labels are either ``scalar`` (flag 0, the class in the header) or a list (flag n >= 1, the class is the first
float, face2rec2 writes ``[class, aligned]``: the ``pair`` style). Readers never depend on the physical record order.
These rules live in :mod:`packer.dataset_rules` (``verify`` checks by the same ones).
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from packer.dataset_rules import (  # the layout and label rules; re-exported here, where tools have found them
    insightface_key_ranges,
    is_header_record,
    is_meta_record,
    label_of,
    meta_label_ok,
    style_of_flags,
)
from packer.errors import UserError
from packer.imageinfo import image_format as sniff_format
from packer.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    at_magic,
    decode_flag,
    decode_length,
    read_record_at,
    unpack,
)

__all__ = [
    "DatasetPaths",
    "DatasetReader",
    "ImageRecord",
    "Property",
    "decode_image",
    "image_ext",
    "image_format",
    "image_shape",
    "is_meta_record",
    "iter_index",
    "label_of",
    "meta_label_ok",
    "parse_index_line",
    "read_head_span",
    "read_index",
    "read_property",
    "require_recordio",
    "resolve_dataset",
    "style_of_flags",
]


class ImageRecord(NamedTuple):
    """One image record: its key, integer class ``label``, the raw ``header`` and the stored image ``body`` bytes."""

    key: int
    label: int
    header: IRHeader
    body: bytes


@dataclass(frozen=True)
class Property:
    """The ``property`` file: ``num_classes,height,width`` on its first line (what every training reader uses).

    ``num_images``: the image count of a second line, as InsightFace's ``RecBuilder`` writes it (``verify`` checks
    it against the data); None when there is no such line. Further lines (``rec2shufrec.py`` writes four) are ignored.
    """

    num_classes: int
    height: int
    width: int
    num_images: int | None = None


@dataclass(frozen=True)
class DatasetPaths:
    """Where a dataset's files are. ``dir`` is the folder holding ``property`` / ``train.lst`` (the .rec's folder)."""

    rec: Path
    idx: Path
    dir: Path

    @property
    def property_file(self) -> Path:
        return self.dir / "property"

    @property
    def lst(self) -> Path:
        return self.rec.with_suffix(".lst")

    @property
    def crc(self) -> Path:
        """The checksum sidecar (``train.rec.crc``; see packer.crcfile)."""
        return self.rec.with_name(self.rec.name + ".crc")


# --------------------------------------------------------------------------------------------------- paths, files


def resolve_dataset(path: str | os.PathLike, *, need_idx: bool = True) -> DatasetPaths:
    """Resolve ``DIR`` (-> ``DIR/train.rec``, ``DIR/train.idx``), ``X.rec`` or ``X.idx`` to the dataset's files.

    Raises UserError when the path, the .rec or (with ``need_idx``) the .idx is missing.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_dir():
        rec, idx = p / "train.rec", p / "train.idx"
        if not rec.is_file():
            others = sorted(x.name for x in p.glob("*.rec"))
            hint = f" (found {', '.join(others)}: pass that file instead)" if others else ""
            raise UserError(f"{p}: no train.rec in this folder{hint}")
    elif p.suffix == ".bin":
        raise UserError(f"{p} is a verification .bin, not a RecordIO dataset (see: gpu-align inspect {p})")
    elif p.suffix == ".idx":
        rec, idx = p.with_suffix(".rec"), p
        if not rec.is_file():
            raise UserError(f"{rec}: no such file (the .rec that goes with {p.name})")
    else:
        rec, idx = p, p.with_suffix(".idx")
    if need_idx and not idx.is_file():
        raise UserError(f"{idx}: index file missing; rebuild it with: gpu-align reindex {rec}")
    return DatasetPaths(rec=rec, idx=idx, dir=rec.parent)


def parse_index_line(line: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """``((key, offset) or None, why mxnet cannot read it or None)`` for one ``.idx`` line.

    mxnet's ``MXIndexedRecordIO`` does ``line.strip().split('\\t')``, then ``int()`` of the first two fields: a blank
    line or a ``key offset`` line separated by spaces stops it with a ValueError. Our readers are lenient (any
    whitespace, blank lines skipped), so the entry is still returned where it can be; the second value says why the
    line is not what mxnet accepts.
    """
    fields = line.strip().split(b"\t")
    with contextlib.suppress(ValueError, IndexError):
        return (int(fields[0]), int(fields[1])), None
    loose = line.split()
    if not loose:
        return None, "blank line (mxnet's MXIndexedRecordIO fails on it with a ValueError)"
    entry = None
    if len(loose) == 2:
        with contextlib.suppress(ValueError):
            entry = (int(loose[0]), int(loose[1]))
    text = line[:60].decode("latin-1").rstrip()
    if entry is not None:
        return entry, f"{text!r} is not separated by a tab (mxnet splits 'key<TAB>offset' on tabs and fails)"
    return None, f"expected 'key<TAB>offset', got {text!r}"


def iter_index(idx_path: str | os.PathLike) -> Iterator[tuple[int, tuple[int, int] | None, str | None]]:
    """``(line number, (key, offset) or None, problem or None)`` per line of a ``.idx`` (see parse_index_line)."""
    with open(idx_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            entry, problem = parse_index_line(line)
            yield lineno, entry, problem


def read_index(idx_path: str | os.PathLike) -> list[tuple[int, int]]:
    """The ``(key, offset)`` entries of a ``.idx`` file in file order; UserError with the line number if malformed.

    Lenient like our RecordIO reader: blank lines are skipped, any whitespace separates (``verify`` reports both).
    """
    entries: list[tuple[int, int]] = []
    for lineno, entry, problem in iter_index(idx_path):
        if entry is None:
            if problem and problem.startswith("blank line"):
                continue
            raise UserError(f"{idx_path}:{lineno}: {problem}")
        entries.append(entry)
    return entries


def read_index_arrays(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of a ``.idx`` as (n,) int64 arrays in file order (vectorised; millions of lines in a second).

    Falls back to :func:`read_index` (which names the bad line) when the file is not clean ``key offset`` lines.
    """
    data = Path(idx_path).read_bytes()
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            flat = np.fromstring(data, dtype=np.int64, sep=" ") if data.strip() else np.zeros(0, np.int64)
    except (ValueError, DeprecationWarning):
        flat = None
    if flat is None or flat.size != 2 * lines:
        entries = read_index(idx_path)  # raises with the line number, or handles blank lines
        flat = np.asarray(entries, dtype=np.int64).reshape(-1)
    pairs = flat.reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


def read_property(path: str | os.PathLike) -> Property | None:
    """The dataset's ``property`` (``num_classes,height,width``), None if the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    lines = p.read_text(errors="replace").strip().splitlines()
    first = lines[0].strip() if lines else ""
    try:
        n, h, w = (int(x) for x in first.split(","))
    except ValueError:
        raise UserError(f"{p}: expected 'num_classes,height,width' on the first line, got {first[:60]!r}") from None
    count = lines[1].strip() if len(lines) > 1 else ""
    return Property(n, h, w, int(count) if count.isdigit() else None)


# --------------------------------------------------------------------------------------------------- images

_EXT = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "gif": ".gif", "webp": ".webp"}
_SHORT = {"JPEG": "jpeg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}  # imageinfo's names


def require_recordio(f: BinaryIO, path: object, size: int) -> None:
    """Raise a :class:`~packer.errors.UserError` unless the file ``f`` (``size`` bytes, at offset 0) is empty or
    starts with the magic: the first check every reader of a ``.rec`` makes, worded once. ``f`` is left past the
    magic."""
    if size and not at_magic(f):
        f.seek(0)
        head = f.read(8)
        raise UserError(
            f"{path} is not a RecordIO file (starts with {head.hex(' ')}, expected the magic {MAGIC_BYTES.hex(' ')})"
        )



def image_format(body: bytes) -> str | None:
    """``"jpeg" | "png" | "bmp" | "gif" | "webp"`` from the body's magic bytes (:func:`packer.imageinfo.image_format`,
    the one sniffer), None if it is none of these."""
    return _SHORT.get(sniff_format(body) or "")


def image_ext(body: bytes) -> str:
    """File extension (with dot) for the stored bytes: ``.jpg`` for JPEG, ``.png`` for PNG...; ``.bin`` if unknown."""
    return _EXT.get(image_format(body) or "", ".bin")


def image_shape(body: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image from its header (no full decode for JPEG/PNG); ValueError if broken."""
    fmt = image_format(body)
    if fmt == "jpeg":
        import simplejpeg

        h, w, _, _ = simplejpeg.decode_jpeg_header(body)
        return int(h), int(w)
    if fmt == "png" and len(body) >= 24 and body[12:16] == b"IHDR":
        w, h = struct.unpack(">II", body[16:24])
        return int(h), int(w)
    img = decode_image(body)
    return img.shape[0], img.shape[1]


def decode_image(body: bytes) -> np.ndarray:
    """Decode stored image bytes strictly: (H, W, 3) uint8 RGB numpy array. ValueError says why it failed.

    JPEG goes through simplejpeg with ``strict=True``, so a truncated or corrupt JPEG fails instead of decoding
    to grey; other formats through OpenCV.
    """
    fmt = image_format(body)
    if not body:
        raise ValueError("empty image body")
    if fmt == "jpeg":
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(body, colorspace="RGB", strict=True)
        except ValueError as e:
            raise ValueError(f"corrupt JPEG: {e}") from None
    if fmt is None:
        raise ValueError(f"not an image (starts with {body[:8].hex(' ')})")
    import cv2

    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"corrupt {fmt.upper()}")
    return np.ascontiguousarray(img[:, :, ::-1])


def read_head_span(f: BinaryIO, offset: int, size: int) -> tuple[IRHeader, int, int]:
    """Header of the record at ``offset``, its body length and its end offset (after the padding), reading only
    the first bytes of a one-part record. RecordIOError if no whole record starts there."""
    f.seek(offset)
    head = f.read(8 + 32)
    if len(head) >= 8 + 24 and head[:4] == MAGIC_BYTES:
        (lrec,) = struct.unpack_from("<I", head, 4)
        cflag, length = decode_flag(lrec), decode_length(lrec)
        flag = struct.unpack_from("<I", head, 8)[0]
        need = 24 + 4 * flag
        end = offset + 8 + ((length + 3) & ~3)
        if cflag == 0 and length >= need and end <= size:
            if need > len(head) - 8:
                head += f.read(need - (len(head) - 8))
            header, _ = unpack(head[8 : 8 + need])
            return header, length - need, end
    header, body = unpack(read_record_at(f, offset))
    return header, len(body), f.tell()


def _read_head(f: BinaryIO, offset: int, size: int) -> tuple[IRHeader, int]:
    """Header of the record at ``offset`` and its body length, reading only the first bytes when possible."""
    header, body_len, _ = read_head_span(f, offset, size)
    return header, body_len


# --------------------------------------------------------------------------------------------------- reader


class DatasetReader:
    """Random access to a RecordIO face dataset by key (context manager).

    Args:
        path: dataset folder (``train.rec``/``train.idx``), a ``.rec`` (sibling ``.idx``) or a ``.idx``.

    Attributes:
        paths: the resolved files. ``property``: the ``property`` file's content or None.
        layout: ``"insightface"`` (key 0 meta header + identity records) or ``"flat"`` (every record an image).
        header: key 0's IRHeader in the insightface layout, else None.
        num_images, num_classes: counts (``num_classes`` of a flat dataset comes from ``property`` when present,
            else from the largest label, which reads every header).
        keys: every key of the .idx in file order.

    Raises UserError for a missing file, a malformed/duplicated .idx, offsets past the end of the .rec, or a
    .rec that is not RecordIO. ``verify`` reports damage in detail; this class stops at the first problem.
    """

    def __init__(self, path: str | os.PathLike):
        self.paths = resolve_dataset(path)
        self.property = read_property(self.paths.property_file)
        keys, offsets = read_index_arrays(self.paths.idx)
        self._idx_keys = keys  # file order
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        dup = np.flatnonzero(np.diff(self._sorted_keys) == 0)
        if len(dup):
            raise UserError(
                f"{self.paths.idx}: key {int(self._sorted_keys[dup[0]])} appears more than once; check with "
                f"'gpu-align verify' and rebuild the index with 'gpu-align reindex {self.paths.rec}'"
            )
        self._f: BinaryIO = open(self.paths.rec, "rb")  # noqa: SIM115 - closed by close()
        self.rec_size = os.fstat(self._f.fileno()).st_size
        try:
            require_recordio(self._f, self.paths.rec, self.rec_size)
        except UserError:
            self.close()
            raise
        past = np.flatnonzero(offsets >= self.rec_size)
        if len(past):
            k, o = int(keys[past[0]]), int(offsets[past[0]])
            self.close()
            raise UserError(
                f"{self.paths.idx}: key {k} points at byte {o}, past the end of {self.paths.rec} "
                f"({self.rec_size} bytes; {len(past)} such keys): the .rec is truncated or the .idx belongs to "
                "another file; run 'gpu-align verify' for details"
            )
        self.header: IRHeader | None = None
        self.layout = "flat"
        if self._has(0):
            header, body = self.read_raw(0)
            if is_header_record(header, len(body)):
                self.header, self.layout = header, "insightface"
        self._labels: np.ndarray | None = None
        self._ranges: list[tuple[int, int]] | None = None
        self._label_style: str | None = None
        if self.header is not None:
            images, identities = insightface_key_ranges(self.header.label[0], self.header.label[1])
            self._image_keys: Sequence[int] = images
            self._identity_keys: Sequence[int] = identities
        else:
            self._image_keys = self._sorted_keys
            self._identity_keys = range(0)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_images

    def _has(self, key: int) -> bool:
        i = int(np.searchsorted(self._sorted_keys, key))
        return i < len(self._sorted_keys) and int(self._sorted_keys[i]) == key

    def _offset(self, key: int) -> int:
        i = int(np.searchsorted(self._sorted_keys, key))
        if i < len(self._sorted_keys) and int(self._sorted_keys[i]) == key:
            return int(self._sorted_offsets[i])
        raise UserError(f"{self.paths.idx}: key {key} is not in the index")

    @property
    def keys(self) -> list[int]:
        """Every key of the .idx, in file order."""
        return self._idx_keys.tolist()

    def _read_payload(self, key: int) -> bytes:
        offset = self._offset(key)
        try:
            return read_record_at(self._f, offset)
        except RecordIOError as e:
            raise UserError(f"{self.paths.rec}: key {key}: {e}") from None

    # ------------------------------------------------------------------ API
    @property
    def num_images(self) -> int:
        return len(self._image_keys)

    @property
    def num_classes(self) -> int:
        if self.header is not None:
            return len(self._identity_keys)
        if self.property is not None:
            return self.property.num_classes
        labels = self.labels()
        return int(labels.max()) + 1 if labels.size else 0

    def image_keys(self) -> list[int]:
        """Keys of the image records in key order (insightface: ``1..N`` from key 0; flat: every key, sorted)."""
        return list(self._image_keys) if isinstance(self._image_keys, range) else self._image_keys.tolist()

    def identity_keys(self) -> list[int]:
        """Keys of the identity records (insightface layout: ``N+1..N+K``), empty for flat."""
        return list(self._identity_keys)

    def read_header(self, key: int) -> IRHeader:
        """The IRHeader of record ``key``, reading only its first bytes."""
        try:
            return _read_head(self._f, self._offset(key), self.rec_size)[0]
        except RecordIOError as e:
            raise UserError(f"{self.paths.rec}: key {key}: {e}") from None

    def read_raw(self, key: int) -> tuple[IRHeader, bytes]:
        """``(header, body)`` of any record (meta records included)."""
        try:
            return unpack(self._read_payload(key))
        except RecordIOError as e:
            raise UserError(f"{self.paths.rec}: key {key}: {e}") from None

    def read(self, key: int) -> ImageRecord:
        """The image record ``key``: ``ImageRecord(key, label, header, body)`` with the stored bytes as-is."""
        header, body = self.read_raw(key)
        return ImageRecord(key, label_of(header), header, body)

    def __iter__(self) -> Iterator[ImageRecord]:
        """Image records in key order."""
        for key in self._image_keys:
            yield self.read(int(key))

    def identity_ranges(self) -> list[tuple[int, int]] | None:
        """``[start, end)`` image keys of each class (from the identity records), None for the flat layout."""
        if self.header is None:
            return None
        if self._ranges is None:
            ranges = []
            for key in self._identity_keys:
                h = self.read_header(key)
                if h.flag < 2:
                    raise UserError(f"{self.paths.rec}: identity record {key} has no [start, end) label")
                ranges.append((int(h.label[0]), int(h.label[1])))
            self._ranges = ranges
        return list(self._ranges)

    def labels(self, progress: bool = False) -> np.ndarray:
        """Class of every image, ``(num_images,)`` int64 in ``image_keys()`` order; reads every image header.

        Headers are read in file-offset order (sequential I/O). Also fixes ``label_style`` from all images.
        """
        if self._labels is None:
            keys = np.asarray(self._image_keys, dtype=np.int64)
            pos = np.searchsorted(self._sorted_keys, keys)
            pos = np.minimum(pos, max(len(self._sorted_keys) - 1, 0))
            missing = keys[self._sorted_keys[pos] != keys] if len(keys) else keys
            if len(missing):
                raise UserError(f"{self.paths.idx}: key {int(missing[0])} is not in the index ({len(missing)} missing)")
            offsets = self._sorted_offsets[pos]
            order = np.argsort(offsets, kind="stable")
            labels = np.empty(len(keys), dtype=np.int64)
            flags = np.empty(len(keys), dtype=np.int64)
            it = order
            if progress:
                from tqdm import tqdm

                it = tqdm(order, desc="reading labels", unit="rec", leave=False, mininterval=0.5)
            for i in it:
                try:
                    h, _ = _read_head(self._f, int(offsets[i]), self.rec_size)
                except RecordIOError as e:
                    raise UserError(f"{self.paths.rec}: key {int(keys[i])}: {e}") from None
                labels[i], flags[i] = label_of(h), h.flag
            self._labels = labels
            self._label_style = style_of_flags(flags)
        return self._labels

    @property
    def label_style(self) -> str:
        """``"scalar"`` (flag 0), ``"pair"`` (list labels, face2rec2's ``[class, aligned]``), ``"mixed"``, or
        ``"none"`` (no images). Sampled from up to 17 images spread over the dataset unless ``labels()`` ran;
        ``verify`` checks every record.
        """
        if self._label_style is None:
            keys = self._image_keys
            if len(keys) == 0:
                return "none"
            picks = sorted({int(keys[round(i * (len(keys) - 1) / 16)]) for i in range(17)})
            self._label_style = style_of_flags(np.asarray([self.read_header(k).flag for k in picks]))
        return self._label_style
