"""dmlc RecordIO, byte-compatible with ``mxnet.recordio`` (mxnet 1.9.1) and without mxnet.

A drop-in for ``mxnet.recordio``: change the import, keep the code::

    from packer import recordio            # instead of: from mxnet import recordio
    rec = recordio.MXIndexedRecordIO("train.idx", "train.rec", "r")
    header, img = recordio.unpack(rec.read_idx(0))

The writer produces the same ``.rec`` and ``.idx`` bytes as mxnet's for the same calls, and each reads the other's
files (tests/test_recordio_mxnet.py checks both against the real mxnet 1.9.1).

On disk (dmlc-core ``recordio.h``), a record is one or more parts, each ``u32 magic, u32 lrec, data``, with
``lrec = cflag << 29 | length``. Where the magic word occurs at a 4-byte-aligned offset of the payload the writer
cuts the payload there and drops those four bytes (the next part's magic stands in for them); cflag is 0 for a
whole record, else 1 (first part), 2 (middle), 3 (last). Zero bytes pad the record to a multiple of 4.
A record payload is a 24-byte ``IRHeader`` (``struct 'IfQQ'``) followed by optional float32 labels and the body.

Where we differ from mxnet 1.9.1 (everything else, the bytes included, is the same):

- Errors: a damaged file raises :class:`RecordIOError` (a ``ValueError`` and a ``RuntimeError``, so code written for
  mxnet's ``MXNetError(RuntimeError)`` still catches it) whose message names the file and byte offsets. Reading a
  writer or writing a reader raises a ``RuntimeError`` that is also an ``AssertionError`` (mxnet asserts).
- ``pack`` of a scalar label beyond float32's range stores ``inf`` (``-inf``), as mxnet does (its native-mode
  ``struct`` casts like C); a plain ``struct.pack('<f')`` would raise ``OverflowError``. List labels become
  ``inf`` through numpy, in both.
- ``unpack`` of a payload shorter than its header raises :class:`RecordIOError` (mxnet: ``struct.error``, or
  numpy's ``ValueError`` for missing labels). The reader also rejects parts whose continuation flags are out of
  order (mxnet joins them blindly).
- ``read_idx`` of a key whose offset is at or past the end of the file raises :class:`RecordIOError`; mxnet
  returns None. After ``read()`` has returned None at the end of the file, ``seek``/``read_idx`` work again; in
  mxnet they keep returning None until ``reset()`` (a dmlc-core bug: its end-of-stream flag is never cleared).
- Pickling a reader leaves the original open at its position (mxnet closes it, so its next ``read()`` raises); the
  copy reopens the file at the start, as in mxnet. Pickling an open writer raises ``TypeError`` (mxnet's copy
  would reopen the file with "w" and truncate it).
- Writers buffer up to 1 MiB in the object and write ``.rec`` data before the ``.idx`` lines that point at it.
  :meth:`MXRecordIO.flush` writes the buffer out (mxnet has no flush). A writer inherited by a forked child
  drops its copy of the buffer when the child closes it, so the parent's pending records are never written twice.
- Extras: ``tell()`` also on readers and on ``MXRecordIO``; context manager; ``write`` accepts any bytes-like
  object; ``uri`` is a ``str`` (mxnet: a ctypes ``c_char_p``) and path-like paths are accepted; blank lines in an
  ``.idx`` are skipped and malformed ones raise :class:`RecordIOError` with the line number; ``IRHeader`` values
  can be pickled (module attribute ``HEADER``). A reader reads its ``.idx`` at open and closes it (``fidx`` is
  None; mxnet keeps it open).
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
    "MAGIC_BYTES",
    "MAX_RECORD_LENGTH",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "at_magic",
    "decode_flag",
    "decode_length",
    "encode_lrec",
    "encode_record",
    "pack",
    "pack_img",
    "read_record_at",
    "scan_records",
    "unpack",
    "unpack_img",
]

MAGIC = 0xCED7230A  # dmlc-core RecordIOWriter::kMagic; the one definition in packer
MAGIC_BYTES = struct.pack("<I", MAGIC)  # b"\x0a\x23\xd7\xce": how every part starts on disk
_LEN_BITS = 29  # lrec = cflag << 29 | length
_LEN_MASK = (1 << _LEN_BITS) - 1
MAX_RECORD_LENGTH = _LEN_MASK  # dmlc-core: CHECK(size < (1 << 29)); lrec keeps the length in 29 bits
_PART_HEAD = struct.Struct("<II")
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")  # indexed by (-size) % 4


def at_magic(f: BinaryIO) -> bool:
    """Whether ``f``'s next four bytes are the RecordIO magic (``f`` moves past them): how every record part starts."""
    return f.read(4) == MAGIC_BYTES


IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
"""Record header ``(flag, label, id, id2)``: ``flag`` 0 = scalar ``label``; n > 0 = n float32 labels before the body."""
HEADER = IRHeader  # the namedtuple's own name, so that pickle finds it (mxnet's IRHeader values cannot be pickled)
_IR_FORMAT = "IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24: 'IfQQ' has no padding in native alignment
_IR_STRUCT = struct.Struct("<" + _IR_FORMAT)  # mxnet packs native 'IfQQ': the same bytes on little-endian hosts

_U32 = np.dtype("<u4")
_MAGIC_U32 = np.uint32(MAGIC)
_count_nonzero = np.count_nonzero
_NP_SCAN_MIN, _NP_SCAN_MAX = 256, 1 << 20  # where the numpy scan in _encode_parts beats bytes.find
_FLUSH_BYTES = 1 << 20  # writer buffer size
_MAX_CHUNKS = 1000  # below IOV_MAX (1024 on Linux): one writev per flush
_writev = getattr(os, "writev", None)


def encode_lrec(cflag: int, length: int) -> int:
    """A part header's second word: continuation flag (0 whole, 1 first, 2 middle, 3 last) and data length.

    dmlc-core ``RecordIOWriter::EncodeLRec``.
    """
    return cflag << _LEN_BITS | length


def decode_flag(lrec: int) -> int:
    """The continuation flag of a part header's ``lrec`` word (dmlc-core ``DecodeFlag``)."""
    return lrec >> _LEN_BITS


def decode_length(lrec: int) -> int:
    """The data length of a part header's ``lrec`` word (dmlc-core ``DecodeLength``)."""
    return lrec & _LEN_MASK


class RecordIOError(ValueError, RuntimeError):
    """The bytes are not valid RecordIO (bad magic, truncated record, offset past the end); the message says where.

    Also a ``RuntimeError``, like mxnet's ``MXNetError``, so ``except RuntimeError`` code written for mxnet works.
    """


class _ModeError(RuntimeError, AssertionError):
    """Reading a writer or writing a reader (mxnet raises AssertionError there)."""


# --------------------------------------------------------------------------------------------------- encoding


def _encode_parts(buf: Any) -> tuple[list[Any], int]:
    """The on-disk pieces of one record holding ``buf`` and their total size, without copying ``buf``.

    ``buf`` is anything with ``len``, ``find`` and slicing (bytes, bytearray, mmap). Usually ``[part header, buf,
    padding]``; where the magic word sits at an aligned offset, ``buf`` is cut there (dmlc-core ``WriteRecord``).
    """
    size = len(buf)
    if size > MAX_RECORD_LENGTH:
        raise RecordIOError(f"record of {size} bytes exceeds the RecordIO limit of {MAX_RECORD_LENGTH} bytes")
    pad = _PADDING[-size % 4]
    if _NP_SCAN_MIN <= size <= _NP_SCAN_MAX:
        # Compare the aligned words at once: ~2x faster than bytes.find on a JPEG of a few KB.
        clean = not _count_nonzero(np.frombuffer(buf, _U32, size >> 2) == _MAGIC_U32)
    else:
        hit = buf.find(MAGIC_BYTES)  # C speed, no temporary array (records of many MB)
        clean = hit < 0 or hit >= size & ~3
    if clean:  # the common case: one part
        return [_PART_HEAD.pack(MAGIC, encode_lrec(0, size)), buf, pad], 8 + size + len(pad)
    lower_align = size & ~3
    hit = buf.find(MAGIC_BYTES)  # the alignment logic below runs only on the rare records that hold the magic
    out: list[Any] = []
    start = 0  # start of the current part's data (dmlc's dptr)
    while 0 <= hit < lower_align:
        if hit % 4 == 0:
            out += (_PART_HEAD.pack(MAGIC, encode_lrec(1 if start == 0 else 2, hit - start)), buf[start:hit])
            start = hit + 4
            hit = buf.find(MAGIC_BYTES, start)
        else:
            hit = buf.find(MAGIC_BYTES, hit + 1)
    out += (_PART_HEAD.pack(MAGIC, encode_lrec(3 if start else 0, size - start)), buf[start:], pad)
    return out, sum(map(len, out))


def encode_record(payload: bytes | bytearray | memoryview) -> bytes:
    """The on-disk bytes of one record holding ``payload`` (parts split at aligned magic words, zero-padded).

    Identical to dmlc-core's ``RecordIOWriter::WriteRecord``. Raises :class:`RecordIOError` above
    :data:`MAX_RECORD_LENGTH` bytes.
    """
    if not isinstance(payload, bytes | bytearray):
        payload = bytes(payload)
    return b"".join(_encode_parts(payload)[0])


def _write_all(fd: int, chunks: list[Any]) -> None:
    """Write ``chunks`` to ``fd`` in order, one ``writev`` per batch, finishing any short write."""
    for i in range(0, len(chunks), _MAX_CHUNKS):
        batch = chunks[i : i + _MAX_CHUNKS]
        if _writev is not None:
            done = _writev(fd, batch)
            total = sum(map(len, batch))
            if done == total:
                continue
            rest = memoryview(b"".join(batch))[done:]
        else:
            rest = memoryview(b"".join(batch))
        while rest:
            rest = rest[os.write(fd, rest) :]


# --------------------------------------------------------------------------------------------------- decoding


def _read_record(f: BinaryIO, offset: int | None = None) -> bytes | None:
    """Read the record at the file's current position (``offset``, for messages); None at a clean end of file."""
    head = f.read(8)
    if len(head) == 8:
        magic, lrec = _PART_HEAD.unpack(head)
        if magic == MAGIC and decode_flag(lrec) == 0:  # fast path: a record in one part
            padded = (lrec + 3) & ~3
            data = f.read(padded)
            if len(data) == padded:
                return data[:lrec]  # a full slice of bytes is the same object: no copy when unpadded
            head += data
    elif not head:
        return None
    # slow path: split records, and every error with its byte positions
    if offset is None:
        offset = f.tell() - len(head)
    f.seek(offset)
    chunks: list[bytes] = []
    pos = offset
    while True:
        head = f.read(8)
        if not head:
            if chunks:
                raise RecordIOError(f"record at byte {offset}: the file ends at byte {pos}, inside a split record")
            return None
        if len(head) < 8:
            raise RecordIOError(f"record at byte {offset}: truncated part header at byte {pos} (the file ends)")
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"byte {pos}: expected RecordIO magic 0x{MAGIC:08x}, found 0x{magic:08x} (not a RecordIO file, "
                "or an offset that does not point at a record)"
            )
        cflag, length = decode_flag(lrec), decode_length(lrec)
        if cflag not in ((2, 3) if chunks else (0, 1)):
            raise RecordIOError(
                f"record at byte {offset}: part at byte {pos} has continuation flag {cflag} out of order"
            )
        padded = (length + 3) & ~3
        data = f.read(padded)
        if len(data) < padded:
            raise RecordIOError(
                f"record at byte {offset}: truncated, needs {padded} bytes at byte {pos + 8} but the file ends "
                f"at byte {pos + 8 + len(data)}"
            )
        chunks.append(data[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return MAGIC_BYTES.join(chunks)


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
    """Sequential RecordIO reader or writer, as ``mxnet.recordio.MXRecordIO``.

    Args:
        uri: path of the ``.rec`` file.
        flag: ``"r"`` to read, ``"w"`` to write (creates or truncates the file).

    Attributes as in mxnet: ``uri`` (str here), ``flag``, ``handle`` (the open file), ``writable``, ``is_open``,
    ``pid`` (the process that opened it). A reader used in a forked child raises ``RuntimeError`` on ``read()``
    and reopens its own file on ``seek``/``read_idx``/``reset``, as in mxnet.
    """

    def __init__(self, uri: str | os.PathLike, flag: str):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.handle: Any = None
        self.pid: int | None = None
        self.is_open = False
        self._chunks: list[Any] = []  # writer: encoded pieces not yet written
        self._pending = 0  # writer: their total size
        self._flushed = 0  # writer: bytes already in the file
        self.open()

    def open(self) -> None:
        """Open the file (a writer truncates it)."""
        if self.flag == "w":
            self.handle = open(self.uri, "wb", buffering=0)  # noqa: SIM115 - lives as long as self; we buffer
            self.writable = True
            self._chunks, self._pending, self._flushed = [], 0, 0
        elif self.flag == "r":
            self.handle = open(self.uri, "rb")  # noqa: SIM115
            self.writable = False
        else:
            raise ValueError(f"Invalid flag {self.flag!r}: use 'r' (read) or 'w' (write)")
        self.pid = os.getpid()
        self.is_open = True

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        state = "open" if getattr(self, "is_open", False) else "closed"
        return f"<{type(self).__name__} {self.uri!r} {self.flag!r} {state}>"

    def __getstate__(self) -> dict[str, Any]:
        # Readers pickle (DataLoader workers with spawn): the copy reopens the file; the original stays as it is.
        if self.is_open and self.writable:
            raise TypeError(
                f"cannot pickle {type(self).__name__} writer {self.uri!r} while it is open: its copy would "
                "truncate the file (close it first)"
            )
        state = self.__dict__.copy()
        state.update(handle=None, is_open=False, pid=None, _reopen=self.is_open)
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
        """Reopen (``allow_reset``) or refuse when used by another process than the opener, as mxnet does.

        A forked child shares the parent's file offset; sequential reads from both would interleave.
        """
        if self.pid != os.getpid():
            if allow_reset:
                self.reset()
            elif not self.is_open:
                raise RuntimeError(f"{self.uri} is closed")
            else:
                raise RuntimeError(
                    f"Forbidden operation in multiple processes: {self.uri} was opened by process {self.pid}; "
                    "open it again in this process (or use seek/read_idx, which reopen)"
                )

    def close(self) -> None:
        """Write out what is buffered (writer) and close. A forked child's copy of a writer drops its buffer."""
        if not getattr(self, "is_open", False):
            return
        try:
            if self.writable and self.pid == os.getpid():
                self._flush_buffers()
        finally:
            self._chunks, self._pending = [], 0
            self.handle.close()
            self.handle = None
            self.is_open = False
            self.pid = None

    def reset(self) -> None:
        """Close and reopen: a reader starts again at the first record (a writer truncates, as in mxnet)."""
        self.close()
        self.open()

    def _flush_buffers(self) -> None:
        if self._chunks:
            chunks, self._chunks, self._pending = self._chunks, [], 0
            _write_all(self.handle.fileno(), chunks)
            self._flushed += sum(map(len, chunks))

    def flush(self, fsync: bool = False) -> None:
        """Writer: write buffered records to the file (and with ``fsync``, to the disk). Not in mxnet."""
        if not self.writable:
            raise _ModeError(f"{self.uri} is opened for reading: flush() is for writers")
        self._check_pid(allow_reset=False)
        self._flush_buffers()
        if fsync:
            os.fsync(self.handle.fileno())

    def write(self, buf: bytes | bytearray | memoryview) -> None:
        """Append one record holding ``buf`` (``RecordIOError`` above :data:`MAX_RECORD_LENGTH` bytes)."""
        if not self.writable:
            raise _ModeError(f"{self.uri} is opened for reading: cannot write")
        self._check_pid(allow_reset=False)
        if type(buf) is not bytes:
            if len(buf) > MAX_RECORD_LENGTH:  # before copying it
                raise RecordIOError(
                    f"record of {len(buf)} bytes exceeds the RecordIO limit of {MAX_RECORD_LENGTH} bytes"
                )
            buf = bytes(buf)  # a private copy: the record is written later, the caller may reuse its buffer
        parts, size = _encode_parts(buf)
        self._chunks += parts
        self._pending += size
        if self._pending >= _FLUSH_BYTES or len(self._chunks) >= _MAX_CHUNKS:
            self._flush_buffers()

    def read(self) -> bytes | None:
        """The next record's payload, or None at the end of the file."""
        if self.writable:
            raise _ModeError(f"{self.uri} is opened for writing: cannot read")
        self._check_pid(allow_reset=False)
        try:
            return _read_record(self.handle)
        except RecordIOError as e:
            raise RecordIOError(f"{self.uri}: {e}") from None

    def tell(self) -> int:
        """Byte offset where the next record will be written or read (mxnet has it on indexed writers only)."""
        if not self.is_open:
            raise RuntimeError(f"{self.uri} is closed")
        if self.writable:
            return self._flushed + self._pending
        return self.handle.tell()


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a text index (``key<TAB>offset`` lines) for random access, as ``mxnet.recordio``'s.

    Args:
        idx_path: path of the ``.idx`` file.
        uri: path of the ``.rec`` file.
        flag: ``"r"`` or ``"w"``.
        key_type: converts keys, both those read from the index and those given to ``write_idx`` (default ``int``).

    ``keys`` lists the keys in index-file order (write order); ``idx`` maps key -> byte offset (a key listed twice
    keeps its last offset and appears twice in ``keys``, as in mxnet).
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.idx: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.key_type = key_type
        self.fidx: Any = None
        self._idx_lines: list[str] = []
        super().__init__(uri, flag)

    def open(self) -> None:
        super().open()
        self.idx = {}
        self.keys = []
        if self.writable:
            self.fidx = open(self.idx_path, "wb", buffering=0)  # noqa: SIM115 - we buffer, see _flush_buffers
            self._idx_lines = []
            return
        self.fidx = None  # mxnet keeps the index file open while reading; we read it at once and close it
        with open(self.idx_path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # as readline: only "\n" ends a line
        key_type, idx, keys = self.key_type, self.idx, self.keys
        for lineno, line in enumerate(lines, 1):
            fields = line.strip().split("\t")
            try:
                key, offset = key_type(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                if not line.strip():
                    continue
                raise RecordIOError(
                    f"{self.idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}"
                ) from None
            idx[key] = offset
            keys.append(key)

    def close(self) -> None:
        if not getattr(self, "is_open", False):
            return
        try:
            super().close()
        finally:
            if self.fidx is not None:
                self.fidx.close()
                self.fidx = None
            self._idx_lines = []

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["fidx"] = None
        if state["_reopen"]:  # open() reads the index again: do not ship it
            state.update(idx={}, keys=[])
        return state

    def _flush_buffers(self) -> None:
        super()._flush_buffers()  # records first: an index line never points past the data in the file
        if self._idx_lines:
            data = "".join(self._idx_lines).encode("utf-8")
            self._idx_lines = []
            _write_all(self.fidx.fileno(), [data])

    def flush(self, fsync: bool = False) -> None:
        super().flush(fsync)
        if fsync:
            os.fsync(self.fidx.fileno())

    def seek(self, idx) -> None:
        """Position the reader at the record with key ``idx`` (``KeyError`` if the index has no such key)."""
        if self.writable:
            raise _ModeError(f"{self.uri} is opened for writing: cannot seek")
        self._check_pid(allow_reset=True)
        self.handle.seek(self.idx[idx])

    def read_idx(self, idx) -> bytes:
        """The payload of the record with key ``idx``."""
        self.seek(idx)
        rec = self.read()
        if rec is None:
            raise RecordIOError(
                f"{self.idx_path}: key {idx!r} points at byte {self.idx[idx]}, at or past the end of {self.uri}"
            )
        return rec

    def write_idx(self, idx, buf: bytes | bytearray | memoryview) -> None:
        """Append a record with key ``key_type(idx)`` and its index line."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self._idx_lines.append(f"{key!s}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)


# ----------------------------------------------------------------------------------------- header + payload


def pack(header: IRHeader | tuple, s: bytes | bytearray | memoryview) -> bytes:
    """Header + body as one record payload, as ``mxnet.recordio.pack``.

    A ``label`` that is a number (Python or numpy scalar) goes in the header and ``flag`` is set to 0, whatever it
    was. Anything else (list, tuple, array, even 0-d) is converted with ``np.asarray(label, np.float32)``: ``flag``
    becomes its size, the header label 0, and the flattened float32 labels go before ``s``. An empty list gives
    flag 0 and label 0.
    """
    header = IRHeader(*header)
    body = s if type(s) is bytes else bytes(s)
    if isinstance(header.label, numbers.Number):
        try:
            return _IR_STRUCT.pack(0, header.label, header.id, header.id2) + body
        except OverflowError:  # beyond float32: mxnet's native 'f' rounds like a C cast (to +-inf); so do we
            with np.errstate(over="ignore"):
                label = np.float32(header.label)
            return _IR_STRUCT.pack(0, label, header.id, header.id2) + body
    label = np.asarray(header.label, dtype=np.float32)
    return b"".join((_IR_STRUCT.pack(label.size, 0, header.id, header.id2), label.tobytes(), body))


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into ``(IRHeader, body)``, as ``mxnet.recordio.unpack``.

    With flag 0 the label is a Python float. With flag n > 0 it is a read-only (n,) float32 numpy array read from
    the n*4 bytes after the header, and the body follows them. Raises :class:`RecordIOError` (a ``ValueError``) when
    ``s`` is too short (mxnet: ``struct.error`` / ``ValueError``).
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


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray | None]:
    """Header and decoded image of a record payload, as ``mxnet.recordio.unpack_img``.

    Decodes with ``cv2.imdecode(body, iscolor)``: (H, W, 3) uint8 **BGR** for colour JPEGs (-1 keeps the stored
    channels, 1 forces BGR, 0 greyscale (H, W)); None if OpenCV cannot decode the body.
    """
    import cv2

    header, s = unpack(s)
    img = cv2.imdecode(np.frombuffer(s, dtype=np.uint8), iscolor)
    return header, img


def pack_img(header: IRHeader | tuple, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode ``img`` with OpenCV and pack it with ``header``, as ``mxnet.recordio.pack_img``.

    Args:
        img: (H, W, 3) uint8 **BGR** (OpenCV order, as mxnet) or (H, W) greyscale.
        quality: JPEG quality 1-100, or PNG compression 0-9 when ``img_fmt`` is ``.png``.
        img_fmt: ``.jpg``/``.jpeg``/``.png``, or any extension ``cv2.imencode`` knows (default parameters).
    """
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
        raise RecordIOError(f"OpenCV failed to encode the image as {img_fmt}")
    return pack(header, buf.tobytes())
