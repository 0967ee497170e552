"""packer.recordio without mxnet: the on-disk format, split records, limits, damaged files, pickling and fork.

The cross-checks against the real mxnet are in test_recordio_mxnet.py.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from packer import recordio
from packer.recordio import (
    MAGIC,
    MAX_RECORD_LENGTH,
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    RecordIOError,
    encode_record,
    pack,
    unpack,
)

M = struct.pack("<I", MAGIC)  # b"\x0a\x23\xd7\xce"


def part(cflag: int, data: bytes) -> bytes:
    """One on-disk part, built by hand from the format description (not by the code under test)."""
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data


def pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def parse_parts(raw: bytes) -> list[tuple[int, bytes]]:
    """Split encoded bytes into (cflag, data) parts, by hand; asserts the structure is well formed."""
    parts, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        n = lrec & ((1 << 29) - 1)
        parts.append((lrec >> 29, raw[pos + 8 : pos + 8 + n]))
        pos += 8 + n + (-n % 4)
    assert pos == len(raw)
    return parts


def write_rec(path, payloads, keys=None) -> list[int]:
    keys = list(range(len(payloads))) if keys is None else keys
    with MXIndexedRecordIO(str(path) + ".idx", path, "w") as w:
        tells = []
        for k, p in zip(keys, payloads, strict=True):
            tells.append(w.tell())
            w.write_idx(k, p)
    return tells


# ------------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", part(0, b"")),
        (b"abc", part(0, b"abc") + b"\0"),
        (b"abcd", part(0, b"abcd")),
        (M, part(1, b"") + part(3, b"")),  # the magic alone: two empty parts
        (M + b"xy", part(1, b"") + part(3, b"xy") + b"\0\0"),  # at offset 0
        (b"abcd" + M, part(1, b"abcd") + part(3, b"")),  # as the last aligned word
        (b"abcd" + M + M + b"efgh", part(1, b"abcd") + part(2, b"") + part(3, b"efgh")),  # adjacent
        (M + b"abcd" + M + b"e", part(1, b"") + part(2, b"abcd") + part(3, b"e") + b"\0\0\0"),
        (b"a" + M + b"bcd", part(0, b"a" + M + b"bcd")),  # unaligned: not cut
        (b"ab" + M + b"cd", part(0, b"ab" + M + b"cd")),
        (b"abc" + M, part(0, b"abc" + M) + b"\0"),
        (b"abcd" + M[:3], part(0, b"abcd" + M[:3]) + b"\0"),  # a partial magic at the end
        (bytes(501) + M + bytes(499), part(0, bytes(501) + M + bytes(499))),  # long (numpy scan), unaligned
        (bytes(500) + M + bytes(500), part(1, bytes(500)) + part(3, bytes(500))),  # long, aligned
    ],
)
def test_encode_record_matches_the_format(payload, expected):
    assert encode_record(payload) == expected
    assert len(expected) % 4 == 0


def test_split_records_round_trip_and_leave_the_magic_only_at_part_heads(tmp_path):
    """Random payloads made of magic and random words: reading joins the parts back; in the file the magic
    occurs at aligned offsets only where a part starts (so a reader can always find record boundaries)."""
    rng = np.random.default_rng(0)
    payloads = []
    for i in range(300):  # short ones, and ones in the numpy-scan size range of the encoder (>= 256 bytes)
        words = rng.integers(0, 2**32, rng.integers(0, 12) if i % 3 else rng.integers(64, 5000), dtype=np.uint32)
        words[rng.random(len(words)) < (0.4 if len(words) < 12 else 3 / len(words))] = MAGIC
        tail = rng.integers(0, 256, rng.integers(0, 4), dtype=np.uint8).tobytes()
        payloads.append(words.astype("<u4").tobytes() + tail)
    assert sum(M in p for p in payloads) > 100
    for p in payloads:
        raw = encode_record(p)
        parts = parse_parts(raw)
        flags = [c for c, _ in parts]
        assert flags == [0] if len(parts) == 1 else flags == [1] + [2] * (len(parts) - 2) + [3]
        assert M.join(d for _, d in parts) == p
        words = np.frombuffer(raw, "<u4")
        heads = np.flatnonzero(words == MAGIC)
        starts, pos = [], 0
        for _, d in parts:
            starts.append(pos // 4)
            pos += 8 + len(d) + (-len(d) % 4)
        assert heads.tolist() == starts
    path = tmp_path / "split.rec"
    write_rec(path, payloads)
    with MXRecordIO(path, "r") as r:
        assert [r.read() for _ in payloads] == payloads
        assert r.read() is None
    with MXIndexedRecordIO(str(path) + ".idx", path, "r") as r:
        for k in rng.permutation(len(payloads)):
            assert r.read_idx(int(k)) == payloads[k]


def test_reader_joins_hand_made_split_record(tmp_path):
    path = tmp_path / "hand.rec"
    path.write_bytes(
        part(1, b"head") + part(2, b"") + part(2, b"midl") + part(3, b"t") + pad(1) + part(0, b"z") + pad(1)
    )
    with MXRecordIO(path, "r") as r:
        assert r.read() == b"head" + M + M + b"midl" + M + b"t"
        assert r.tell() == 44
        assert r.read() == b"z"
        assert r.read() is None


def test_large_record_with_magic_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    big = bytearray(rng.integers(0, 256, 5_000_001, dtype=np.uint8).tobytes())
    for off in (0, 4, 1_000_000, 4_999_992, 2_500_001):
        big[off : off + 4] = M
    big = bytes(big)
    raw = encode_record(big)
    assert [c for c, _ in parse_parts(raw)] == [1, 2, 2, 2, 3]
    write_rec(tmp_path / "big.rec", [b"x", big, b"y"])
    with MXIndexedRecordIO(tmp_path / "big.rec.idx", tmp_path / "big.rec", "r") as r:
        assert r.read_idx(1) == big
        assert r.read_idx(2) == b"y"


# -------------------------------------------------------------------------------------------------- limits


def test_record_length_limit_without_allocating_512_mb():
    """2^29 - 1 bytes is accepted, 2^29 is refused (dmlc-core: size < 1 << 29). Zero pages of an anonymous
    mmap stand in for the payload (private: reads map the kernel's zero page, nothing is allocated); the writer's own
    encoder is what runs."""
    with mmap.mmap(-1, MAX_RECORD_LENGTH, flags=mmap.MAP_PRIVATE) as ok:
        parts, size = recordio._encode_parts(ok)
        assert struct.unpack("<II", parts[0]) == (MAGIC, MAX_RECORD_LENGTH)  # cflag 0, the full 29-bit length
        assert parts[1] is ok and parts[2] == b"\0"
        assert size == 8 + MAX_RECORD_LENGTH + 1
    with mmap.mmap(-1, MAX_RECORD_LENGTH + 1, flags=mmap.MAP_PRIVATE) as too_big:
        with pytest.raises(RecordIOError, match=f"{MAX_RECORD_LENGTH + 1} bytes exceeds the RecordIO limit"):
            recordio._encode_parts(too_big)
        with pytest.raises(RecordIOError, match="exceeds the RecordIO limit"):
            encode_record(memoryview(too_big))


def test_writer_refuses_too_long_record_and_stays_usable(tmp_path):
    path = tmp_path / "limit.rec"
    with (
        MXIndexedRecordIO(tmp_path / "limit.idx", path, "w") as w,
        mmap.mmap(-1, MAX_RECORD_LENGTH + 1, flags=mmap.MAP_PRIVATE) as big,
    ):
        w.write_idx(0, b"before")
        with pytest.raises(RecordIOError, match="exceeds the RecordIO limit"):
            w.write_idx(1, big)
        w.write_idx(2, b"after")
    with MXIndexedRecordIO(tmp_path / "limit.idx", path, "r") as r:
        assert r.keys == [0, 2]
        assert [r.read_idx(0), r.read_idx(2)] == [b"before", b"after"]


def test_reader_decodes_length_at_the_limit(tmp_path):
    """A part header with the largest length: the reader wants all 2^29 padded bytes and says so."""
    path = tmp_path / "huge.rec"
    path.write_bytes(struct.pack("<II", MAGIC, MAX_RECORD_LENGTH) + b"\0" * 100)
    with MXRecordIO(path, "r") as r, pytest.raises(RecordIOError, match=f"needs {1 << 29} bytes at byte 8"):
        r.read()


# ---------------------------------------------------------------------------------------- damaged files


def test_truncated_files_report_byte_positions(tmp_path):
    good = tmp_path / "good.rec"
    payloads = [b"a" * 10, b"b" * 30, b"abcd" + M + b"d" * 20]  # the last one is split in two parts
    tells = write_rec(good, payloads)
    raw = good.read_bytes()
    assert tells == [0, 20, 60] and len(raw) == 100
    cases = {
        98: "record at byte 60: truncated, needs 20 bytes at byte 80 but the file ends at byte 98",  # last part
        64: "record at byte 60: truncated part header at byte 60",
        72: "record at byte 60: the file ends at byte 72, inside a split record",  # after the first part
        50: "record at byte 20: truncated, needs 32 bytes at byte 28 but the file ends at byte 50",
    }
    for size, message in cases.items():
        bad = tmp_path / f"cut{size}.rec"
        bad.write_bytes(raw[:size])
        with MXRecordIO(bad, "r") as r:
            got = []
            with pytest.raises(RecordIOError, match=message) as err:
                while True:
                    got.append(r.read())
            assert str(bad) in str(err.value)
            assert got == payloads[: len(got)]
        assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


def test_bad_magic_and_bad_offsets(tmp_path):
    zeros = tmp_path / "zeros.rec"
    zeros.write_bytes(bytes(16))
    with MXRecordIO(zeros, "r") as r, pytest.raises(RecordIOError, match="byte 0: expected RecordIO magic"):
        r.read()
    path = tmp_path / "ok.rec"
    write_rec(path, [b"x" * 40, b"y"])
    idx = tmp_path / "wrong.idx"
    idx.write_text(f"0\t0\n1\t8\n2\t{path.stat().st_size}\n")
    with MXIndexedRecordIO(idx, path, "r") as r:
        assert r.read_idx(0) == b"x" * 40
        with pytest.raises(RecordIOError, match="byte 8: expected RecordIO magic 0xced7230a, found 0x78787878"):
            r.read_idx(1)
        with pytest.raises(RecordIOError, match="key 2 points at byte 60, at or past the end"):
            r.read_idx(2)
        with pytest.raises(KeyError):
            r.read_idx(3)


def test_continuation_flags_out_of_order(tmp_path):
    path = tmp_path / "order.rec"
    path.write_bytes(part(3, b"abcd"))
    with MXRecordIO(path, "r") as r, pytest.raises(RecordIOError, match="continuation flag 3 out of order"):
        r.read()
    path.write_bytes(part(1, b"abcd") + part(0, b"efgh"))
    with MXRecordIO(path, "r") as r, pytest.raises(RecordIOError, match="continuation flag 0 out of order"):
        r.read()


def test_scan_records_stops_at_damage(tmp_path):
    path = tmp_path / "scan.rec"
    tells = write_rec(path, [b"one", b"two" + M, b"three"])
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with open(path, "rb") as f:
        got = []
        with pytest.raises(RecordIOError, match=f"record at byte {tells[2]}"):
            for item in recordio.scan_records(f):
                got.append(item)
        assert got == [(tells[0], b"one"), (tells[1], b"two" + M)]
        assert recordio.read_record_at(f, tells[1]) == b"two" + M


def test_idx_lines(tmp_path):
    path = tmp_path / "i.rec"
    write_rec(path, [b"a", b"b"])
    idx = tmp_path / "i.idx"
    idx.write_text("0\t0\n\n1\t12\n  \n")
    with MXIndexedRecordIO(idx, path, "r") as r:
        assert r.keys == [0, 1] and r.read_idx(1) == b"b"
    idx.write_text("0\t0\n1 12\n")
    with pytest.raises(RecordIOError, match=r"i.idx:2: expected 'key<TAB>offset', got '1 12'"):
        MXIndexedRecordIO(idx, path, "r")


# --------------------------------------------------------------------------------- the mxnet-like API


def test_indexed_write_read_tell_keys(tmp_path):
    rng = np.random.default_rng(2)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 9000, 400)]
    keys = [int(k) for k in rng.permutation(10_000)[:400]]
    tells = write_rec(tmp_path / "t.rec", payloads, keys)
    expected_offsets = np.cumsum([0] + [8 + len(p) + (-len(p) % 4) for p in payloads])
    assert tells == expected_offsets[:-1].tolist()
    assert (tmp_path / "t.rec").stat().st_size == expected_offsets[-1]
    assert (tmp_path / "t.rec.idx").read_text() == "".join(f"{k}\t{t}\n" for k, t in zip(keys, tells, strict=True))
    with MXIndexedRecordIO(tmp_path / "t.rec.idx", tmp_path / "t.rec", "r") as r:
        assert r.keys == keys and r.idx == dict(zip(keys, tells, strict=True))
        for i in rng.permutation(400)[:100]:
            assert r.read_idx(np.int64(keys[i])) == payloads[i]  # numpy keys, as arcface_torch passes them
            assert r.tell() == expected_offsets[i + 1]
        r.seek(keys[5])
        assert [r.read() for _ in range(3)] == payloads[5:8]


def test_read_at_end_and_seek_after_it(tmp_path):
    write_rec(tmp_path / "e.rec", [b"a", b"b"])
    with MXIndexedRecordIO(tmp_path / "e.rec.idx", tmp_path / "e.rec", "r") as r:
        assert [r.read(), r.read(), r.read(), r.read()] == [b"a", b"b", None, None]
        assert r.read_idx(0) == b"a"  # mxnet 1.9.1 returns None here (sticky end-of-stream); we do not
        r.reset()
        assert r.read() == b"a"


def test_key_type_and_duplicate_keys(tmp_path):
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    with MXIndexedRecordIO(idx, rec, "w", key_type=str) as w:
        w.write_idx(5, b"five")
        w.write_idx("ä", b"umlaut")
        w.write_idx(5, b"again")
        assert w.keys == ["5", "ä", "5"]
    assert idx.read_text(encoding="utf-8") == "5\t0\nä\t12\n5\t28\n"
    with MXIndexedRecordIO(idx, rec, "r", key_type=str) as r:
        assert r.keys == ["5", "ä", "5"] and r.read_idx("5") == b"again" and r.read_idx("ä") == b"umlaut"


def test_modes_close_and_reset(tmp_path):
    path = tmp_path / "m.rec"
    with pytest.raises(ValueError, match="Invalid flag 'a'"):
        MXRecordIO(path, "a")
    w = MXRecordIO(path, "w")
    w.write(bytearray(b"one"))
    w.write(memoryview(b"two"))
    with pytest.raises(TypeError):
        w.write("text")
    with pytest.raises(AssertionError):  # mxnet asserts; ours is a RuntimeError too
        w.read()
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="is closed"):
        w.write(b"x")
    r = MXRecordIO(path, "r")
    with pytest.raises(RuntimeError, match="opened for reading"):
        r.write(b"x")
    assert r.read() == b"one"
    r.reset()
    assert [r.read(), r.read()] == [b"one", b"two"]
    r.close()
    with pytest.raises(RuntimeError, match="is closed"):
        r.read()
    w = MXRecordIO(path, "w")
    w.write(b"new")
    w.reset()  # truncates, as mxnet's
    w.write(b"newer")
    w.close()
    with MXRecordIO(path, "r") as r:
        assert [r.read(), r.read()] == [b"newer", None]


def test_read_idx_reopens_a_closed_reader(tmp_path):
    write_rec(tmp_path / "c.rec", [b"a", b"b"])
    r = MXIndexedRecordIO(tmp_path / "c.rec.idx", tmp_path / "c.rec", "r")
    r.close()
    assert r.read_idx(1) == b"b"  # mxnet: seek resets a reader whose pid does not match (None after close)
    r.close()


def test_flush_writes_records_before_their_index_lines(tmp_path):
    """At every moment, each index line on disk points at a complete record on disk; flush() catches up."""
    rec, idx = tmp_path / "f.rec", tmp_path / "f.idx"
    rng = np.random.default_rng(3)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 200_000, 60)]
    with MXIndexedRecordIO(idx, rec, "w") as w:
        for i, p in enumerate(payloads):
            w.write_idx(i, p)
            with MXIndexedRecordIO(idx, rec, "r") as r:
                for k in r.keys:
                    assert r.read_idx(k) == payloads[k]
            if i == 30:
                w.flush(fsync=True)
                assert rec.stat().st_size == w.tell()
                assert len(idx.read_text().splitlines()) == 31
        assert rec.stat().st_size < w.tell()  # the last records are still buffered...
    assert rec.stat().st_size == sum(8 + len(p) + (-len(p) % 4) for p in payloads)  # ...and close wrote them


# ------------------------------------------------------------------------------------ pickling and fork


def _read_keys(reader, keys):
    return [reader.read_idx(k) for k in keys]


def test_pickled_reader_reopens_and_original_keeps_its_position(tmp_path):
    payloads = [bytes([i]) * (i + 1) for i in range(20)]
    write_rec(tmp_path / "p.rec", payloads)
    r = MXIndexedRecordIO(tmp_path / "p.rec.idx", tmp_path / "p.rec", "r")
    assert r.read() == payloads[0]
    blob = pickle.dumps(r)
    assert len(blob) < 1000  # the index is read again by the copy, not shipped
    assert r.read() == payloads[1]  # mxnet closes the original here
    copy = pickle.loads(blob)
    assert copy.read() == payloads[0] and copy.keys == list(range(20))
    # and across a process boundary, as a DataLoader with spawn workers does
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_keys, (r, [19, 3])) == [payloads[19], payloads[3]]
    r.close()
    closed = pickle.loads(pickle.dumps(r))
    assert not closed.is_open


def test_writer_pickling_is_refused_while_open(tmp_path):
    w = MXIndexedRecordIO(tmp_path / "w.idx", tmp_path / "w.rec", "w")
    w.write_idx(0, b"data")
    with pytest.raises(TypeError, match="cannot pickle MXIndexedRecordIO writer"):
        pickle.dumps(w)
    w.close()
    assert not pickle.loads(pickle.dumps(w)).is_open
    with MXIndexedRecordIO(tmp_path / "w.idx", tmp_path / "w.rec", "r") as r:
        assert r.read_idx(0) == b"data"


def _in_child(fn) -> str:
    """Run ``fn()`` in a forked child; its return value (a str) or the exception's type comes back."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            out = fn()
        except BaseException as e:
            out = f"{type(e).__name__}: {e}"
        os.write(wr, out.encode())
        os._exit(0)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_fork_reader(tmp_path):
    payloads = [b"rec%d" % i for i in range(50)]
    write_rec(tmp_path / "k.rec", payloads)
    r = MXIndexedRecordIO(tmp_path / "k.rec.idx", tmp_path / "k.rec", "r")
    assert r.read() == payloads[0]
    # sequential read in the child: refused, as mxnet ("Forbidden operation in multiple processes")
    assert _in_child(lambda: repr(r.read())).startswith("RuntimeError: Forbidden operation in multiple processes")
    # random access in the child reopens the file, so the parent's shared file offset is not moved
    assert _in_child(lambda: b"|".join(r.read_idx(k) for k in (40, 7)).decode()) == "rec40|rec7"
    assert r.read() == payloads[1]
    r.close()


def test_fork_writer_does_not_write_the_parents_buffer_twice(tmp_path):
    rec, idx = tmp_path / "fw.rec", tmp_path / "fw.idx"
    w = MXIndexedRecordIO(idx, rec, "w")
    for i in range(10):
        w.write_idx(i, b"parent%d" % i)  # buffered, not yet in the file

    def child():
        try:
            w.write_idx(99, b"child")
        except RuntimeError as e:
            w.close()  # drops the child's copy of the buffer
            return str(e)
        return "written"

    assert _in_child(child).startswith("Forbidden operation in multiple processes")
    w.write_idx(10, b"parent10")
    w.close()
    with MXIndexedRecordIO(idx, rec, "r") as r:
        assert r.keys == list(range(11))
        assert [r.read() for _ in range(12)] == [b"parent%d" % i for i in range(11)] + [None]


def test_dataloader_workers_read_by_key(tmp_path):
    torch = pytest.importorskip("torch")
    payloads = [pack(IRHeader(0, float(i % 7), i, 0), bytes(i)) for i in range(64)]
    write_rec(tmp_path / "d.rec", payloads)

    class Records(torch.utils.data.Dataset):
        def __init__(self):
            self.rec = MXIndexedRecordIO(tmp_path / "d.rec.idx", tmp_path / "d.rec", "r")

        def __len__(self):
            return len(self.rec.keys)

        def __getitem__(self, i):
            header, body = unpack(self.rec.read_idx(i))
            return int(header.label), len(body), header.id

    loader = torch.utils.data.DataLoader(Records(), batch_size=8, num_workers=2, multiprocessing_context="fork")
    got = [tuple(map(int, t)) for batch in loader for t in zip(*batch, strict=True)]
    assert got == [(i % 7, i, i) for i in range(64)]


# ------------------------------------------------------------------------------------ pack and unpack


@pytest.mark.parametrize(
    ("label", "flag", "expected"),
    [
        (3, 0, 3.0),
        (2.5, 0, 2.5),
        (True, 0, 1.0),
        (np.float32(4.5), 0, 4.5),
        (np.int64(7), 0, 7.0),
        ([1, 2.5], 2, [1.0, 2.5]),
        ((9,), 1, [9.0]),
        (np.array(3.0), 1, [3.0]),  # 0-d array: not a numbers.Number, so one float32 label
        (np.arange(6).reshape(2, 3), 6, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        ([], 0, 0.0),
    ],
)
def test_pack_unpack_labels(label, flag, expected):
    s = pack(IRHeader(123, label, 2**63 + 5, 77), b"body\x00")
    n = flag if flag else 0
    assert len(s) == 24 + 4 * n + 5
    assert s[:4] == struct.pack("<I", flag)  # the given flag (123) is ignored, as in mxnet
    header, body = unpack(s)
    assert body == b"body\x00" and header.flag == flag and (header.id, header.id2) == (2**63 + 5, 77)
    if flag:
        assert header.label.dtype == np.float32 and header.label.tolist() == expected
        assert not header.label.flags.writeable
    else:
        assert type(header.label) is float and header.label == expected


def test_unpack_errors_and_header_pickles():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack(b"short")
    with pytest.raises(ValueError, match="says 3 labels but only 2 bytes"):
        unpack(struct.pack("<IfQQ", 3, 0, 0, 0) + b"ab")
    h = IRHeader(0, 1.0, 2, 3)
    assert pickle.loads(pickle.dumps(h)) == h and repr(h) == "HEADER(flag=0, label=1.0, id=2, id2=3)"


def test_pack_img_is_bgr_like_opencv(load_photo):
    rgb = load_photo("astronaut")[100:212, 180:292]  # 112×112 around the face
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    s = recordio.pack_img(IRHeader(0, [4, 1], 9, 0), bgr, quality=95)
    header, body = unpack(s)
    assert header.label.tolist() == [4.0, 1.0] and body[:2] == b"\xff\xd8"
    assert body == cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    header, img = recordio.unpack_img(s)
    assert img.shape == (112, 112, 3) and np.abs(img.astype(int) - bgr).mean() < 3  # BGR in, BGR out
    assert np.abs(img.astype(int) - rgb).mean() > 10  # (the photo is not grey: a swap would show)
    _, png = recordio.unpack_img(recordio.pack_img(IRHeader(0, 1, 0, 0), bgr, 3, ".png"))
    assert np.array_equal(png, bgr)
    _, grey = recordio.unpack_img(s, 0)
    assert grey.shape == (112, 112)
