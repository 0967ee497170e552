"""dmlc RecordIO, byte-compatible with ``mxnet.recordio`` and without mxnet.

A drop-in for the parts of ``mxnet.recordio`` that face-recognition code uses::

    from packer import recordio            # instead of: from mxnet import recordio
    rec = recordio.MXIndexedRecordIO("train.idx", "train.rec", "r")
    header, img = recordio.unpack(rec.read_idx(0))

On disk (dmlc-core ``recordio.h``), a record is one or more parts, each ``u32 magic, u32 lrec, data``, with
``lrec = cflag << 29 | length``. Where the magic word occurs at a 4-byte-aligned offset of the payload the writer
cuts the payload there and drops those four bytes (the next part's magic stands in for them); cflag is 0 for a
whole record, else 1 (first part), 2 (middle), 3 (last). Zero bytes pad the record to a multiple of 4.
A record payload is a 24-byte ``IRHeader`` (``struct 'IfQQ'``) followed by optional float32 labels and the body.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections import namedtuple
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "MAGIC",
    "MAX_RECORD_LENGTH",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "encode_record",
    "pack",
    "pack_img",
    "read_record_at",
    "scan_records",
    "unpack",
    "unpack_img",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD_LENGTH = (1 << 29) - 1  # lrec keeps the length in 29 bits
_LEN_MASK = (1 << 29) - 1
_PART_HEAD = struct.Struct("<II")

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
"""Record header: ``flag`` (0 = scalar label, n > 0 = n float32 labels before the body), ``label``, ``id``, ``id2``."""
_IR_FORMAT = "IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24: 'IfQQ' has no padding in native alignment on the platforms we run on
_IR_STRUCT = struct.Struct("<" + _IR_FORMAT)


class RecordIOError(ValueError):
    """The bytes are not valid RecordIO (bad magic, truncated record, offset past the end); says where."""


# --------------------------------------------------------------------------------------------------- encoding


def encode_record(payload: bytes | bytearray | memoryview) -> bytes:
    """The on-disk bytes of one record holding ``payload`` (parts split at aligned magic words, zero-padded).

    Identical to dmlc-core's ``RecordIOWriter::WriteRecord``.
    """
    buf = bytes(payload)
    size = len(buf)
    if size > MAX_RECORD_LENGTH:
        raise RecordIOError(f"record of {size} bytes exceeds the RecordIO limit of {MAX_RECORD_LENGTH} bytes")
    lower_align = size & ~3
    out: list[bytes] = []
    start = 0  # start of the current part's data
    hit = buf.find(_MAGIC_BYTES)  # C-speed scan; the alignment check below runs only on the rare hits
    while 0 <= hit < lower_align:
        if hit % 4 == 0:
            out += (_PART_HEAD.pack(MAGIC, (1 if start == 0 else 2) << 29 | (hit - start)), buf[start:hit])
            start = hit + 4
            hit = buf.find(_MAGIC_BYTES, start)
        else:
            hit = buf.find(_MAGIC_BYTES, hit + 1)
    out += (_PART_HEAD.pack(MAGIC, (3 if start else 0) << 29 | (size - start)), buf[start:])
    out.append(b"\0" * (-size % 4))
    return b"".join(out)


def _read_record(f: BinaryIO, offset: int) -> bytes | None:
    """Read the record starting at the file's current position (``offset``); None at a clean end of file."""
    chunks: list[bytes] = []
    pos = offset
    while True:
        head = f.read(8)
        if not head:
            if chunks:
                raise RecordIOError(f"record at byte {offset}: file ends inside a split record")
            return None
        if len(head) < 8:
            raise RecordIOError(f"record at byte {offset}: truncated part header at byte {pos}")
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"byte {pos}: expected RecordIO magic 0x{MAGIC:08x}, found 0x{magic:08x} (not a RecordIO file, "
                "or an offset that does not point at a record)"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if cflag not in ((2, 3) if chunks else (0, 1)):
            raise RecordIOError(
                f"record at byte {offset}: part at byte {pos} has continuation flag {cflag} out of order"
            )
        padded = (length + 3) & ~3
        data = f.read(padded)
        if len(data) < padded:
            raise RecordIOError(
                f"record at byte {offset}: truncated, needs {padded} bytes at byte {pos + 8} but the file ends"
            )
        chunks.append(data[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(chunks)


def read_record_at(f: BinaryIO, offset: int) -> bytes:
    """The payload of the record whose first magic is at ``offset`` in the open binary file ``f``."""
    f.seek(offset)
    rec = _read_record(f, offset)
    if rec is None:
        raise RecordIOError(f"offset {offset} is at or past the end of the file")
    return rec


def scan_records(f: BinaryIO, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for every record from ``start`` to the end of ``f``, in file order.

    Raises :class:`RecordIOError` at the first damaged record; the offsets already yielded are the whole records
    before it (what ``reindex --repair`` keeps).
    """
    f.seek(start)
    offset = start
    while (rec := _read_record(f, offset)) is not None:
        yield offset, rec
        offset = f.tell()


# ------------------------------------------------------------------------------------------------ mxnet API


class MXRecordIO:
    """Sequential RecordIO reader/writer, as ``mxnet.recordio.MXRecordIO``.

    Args:
        uri: path of the ``.rec`` file.
        flag: ``"r"`` to read, ``"w"`` to write (truncates).
    """

    def __init__(self, uri: str | os.PathLike, flag: str):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.handle: BinaryIO | None = None
        self.pid: int | None = None
        self.is_open = False
        self.open()

    def open(self) -> None:
        if self.flag == "w":
            self.handle = open(self.uri, "wb", buffering=1 << 20)  # noqa: SIM115 - lives as long as self
            self.writable = True
        elif self.flag == "r":
            self.handle = open(self.uri, "rb")  # noqa: SIM115
            self.writable = False
        else:
            raise ValueError(f"Invalid flag {self.flag!r}: use 'r' or 'w'")
        self.pid = os.getpid()
        self.is_open = True

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable like mxnet's (DataLoader workers): the copy reopens the file. Writers cannot be pickled.
        is_open = self.is_open
        self.close()
        state = self.__dict__.copy()
        state["handle"] = None
        state["is_open"] = False
        if is_open:
            self.open()
        state["_reopen"] = is_open
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopen = state.pop("_reopen", False)
        self.__dict__.update(state)
        if reopen:
            self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_pid(self, allow_reset: bool = False) -> None:
        """A forked child shares the parent's file offset; reopen so readers in workers do not race."""
        if self.pid != os.getpid():
            if not allow_reset:
                raise RuntimeError("Forbidden operation in multiple processes")
            self.reset()

    def close(self) -> None:
        if not getattr(self, "is_open", False):
            return
        self.handle.close()
        self.handle = None
        self.is_open = False
        self.pid = None

    def reset(self) -> None:
        """Close and reopen: a reader starts again at the first record (a writer truncates, as in mxnet)."""
        self.close()
        self.open()

    def write(self, buf: bytes) -> None:
        """Append one record holding ``buf``."""
        if not self.writable:
            raise RuntimeError(f"{self.uri} is opened for reading")
        self._check_pid(allow_reset=False)
        self.handle.write(encode_record(buf))

    def read(self) -> bytes | None:
        """The next record's payload, or None at the end of the file."""
        if self.writable:
            raise RuntimeError(f"{self.uri} is opened for writing")
        self._check_pid(allow_reset=True)
        return _read_record(self.handle, self.handle.tell())

    def tell(self) -> int:
        """Byte offset where the next record will be written or read."""
        self._check_pid(allow_reset=True)
        return self.handle.tell()


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a text index (``key<TAB>offset`` lines) for random access, as ``mxnet.recordio``'s.

    Args:
        idx_path: path of the ``.idx`` file.
        uri: path of the ``.rec`` file.
        flag: ``"r"`` or ``"w"``.
        key_type: converts index keys read from the file (default ``int``).
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.idx: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.key_type = key_type
        self.fidx = None
        super().__init__(uri, flag)

    def open(self) -> None:
        super().open()
        self.idx = {}
        self.keys = []
        self.fidx = open(self.idx_path, self.flag)  # noqa: SIM115 - text mode, like mxnet
        if not self.writable:
            for lineno, line in enumerate(self.fidx, 1):
                fields = line.strip().split("\t")
                if fields == [""]:
                    continue
                try:
                    key, offset = self.key_type(fields[0]), int(fields[1])
                except (ValueError, IndexError):
                    raise RecordIOError(
                        f"{self.idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}"
                    ) from None
                self.idx[key] = offset
                self.keys.append(key)

    def close(self) -> None:
        if not getattr(self, "is_open", False):
            return
        super().close()
        self.fidx.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["fidx"] = None
        return state

    def seek(self, idx) -> None:
        """Position the reader at the record with key ``idx``."""
        if self.writable:
            raise RuntimeError(f"{self.uri} is opened for writing")
        self._check_pid(allow_reset=True)
        self.handle.seek(self.idx[idx])

    def read_idx(self, idx) -> bytes:
        """The payload of the record with key ``idx``."""
        self.seek(idx)
        rec = self.read()
        if rec is None:
            raise RecordIOError(
                f"{self.idx_path}: key {idx} points at byte {self.idx[idx]}, past the end of {self.uri}"
            )
        return rec

    def write_idx(self, idx, buf: bytes) -> None:
        """Append a record with key ``idx`` and its index line."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self.fidx.write(f"{key}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)


# ----------------------------------------------------------------------------------------- header + payload


def pack(header: IRHeader | tuple, s: bytes) -> bytes:
    """Header + body as one record payload, as ``mxnet.recordio.pack``.

    A scalar ``label`` is stored in the header (flag 0); a sequence of labels sets flag = its length, the header
    label to 0, and puts the labels as float32 before ``s``.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + bytes(s)
    return _IR_STRUCT.pack(*header) + bytes(s)


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into ``(IRHeader, body)``, as ``mxnet.recordio.unpack``.

    With flag > 0 the header's label is a float32 numpy array of that length, read from before the body.
    """
    if len(s) < _IR_SIZE:
        raise RecordIOError(f"record of {len(s)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    header = IRHeader(*_IR_STRUCT.unpack_from(s))
    s = s[_IR_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(f"record header says {header.flag} labels but only {len(s)} bytes follow it")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[header.flag * 4 :]
    return header, s


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray]:
    """Header and decoded image (OpenCV, so BGR) of a record payload, as ``mxnet.recordio.unpack_img``."""
    import cv2

    header, s = unpack(s)
    img = cv2.imdecode(np.frombuffer(s, dtype=np.uint8), iscolor)
    return header, img


def pack_img(header: IRHeader | tuple, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode ``img`` (BGR, as OpenCV) and pack it with ``header``, as ``mxnet.recordio.pack_img``."""
    import cv2

    fmt = img_fmt.upper()
    if fmt in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    else:
        params = None
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise RecordIOError(f"failed to encode image as {img_fmt}")
    return pack(header, buf.tobytes())
