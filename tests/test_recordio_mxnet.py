"""packer.recordio against the real mxnet 1.9.1 (in its own venv, see mxnet_env.py), in both directions.

For the same calls, our ``.rec``/``.idx`` files are byte-identical to mxnet's; mxnet reads every record of ours
(payloads and unpacked headers); we read every record of mxnet's; ``pack`` gives the same bytes; ``pack_img`` /
``unpack_img`` agree. The first run builds the venv (~1 min, needs PyPI); without it these tests FAIL with the reason,
unless GPU_ALIGN_SKIP_MXNET=1 is set.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import cv2
import mxnet_env
import numpy as np
import pytest

from packer import recordio
from packer.recordio import MAGIC, IRHeader, MXIndexedRecordIO, MXRecordIO

pytestmark = pytest.mark.mxnet

M = MAGIC.to_bytes(4, "little")


@pytest.mark.slow
def test_venv_build_failure_is_an_error_that_says_why(tmp_path, monkeypatch):
    """No package index (as without network): a clear MxnetUnavailable, and no half-built venv is left to reuse."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    dest = mxnet_env.venv_dir()
    stale = dest.parent / f"{dest.name}.tmp-12345"  # a build that was killed
    (stale / "bin").mkdir(parents=True)
    (dest / "bin").mkdir(parents=True)  # a folder without the ready marker
    with pytest.raises(
        mxnet_env.MxnetUnavailable, match=r"(?s)pip install mxnet==1\.9\.1.*failed.*GPU_ALIGN_SKIP_MXNET=1"
    ):
        mxnet_env.mxnet_python()
    assert sorted(p.name for p in dest.parent.iterdir()) == [f"{dest.name}.lock"]


# --------------------------------------------------------------------------------------------------- cases
# A case: keys, headers (None = raw payload written as is; else [flag, label spec, id, id2] packed with `pack`),
# bodies, and whether it is written through MXIndexedRecordIO (else MXRecordIO, no .idx).


def _random(rng, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _words_with_magic(rng, n_words: int, p: float, tail: int) -> bytes:
    words = rng.integers(0, 2**32, n_words, dtype=np.uint32)
    words[rng.random(n_words) < p] = MAGIC
    return words.astype("<u4").tobytes() + _random(rng, tail)


def _face_jpegs(load_photo) -> list[bytes]:
    rgb = load_photo("astronaut")
    out = []
    for y, x in [(60, 160), (100, 180), (0, 0), (300, 300)]:
        crop = cv2.resize(np.ascontiguousarray(rgb[y : y + 200, x : x + 200]), (112, 112))
        out.append(cv2.imencode(".jpg", crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return out


LABELS = [
    3,
    2.5,
    {"np": "float32", "value": 4.5},
    {"np": "int64", "value": 7},
    {"bool": True},
    [1, 2.5],
    {"tuple": [9]},
    {"array": "float64", "value": 3.0},  # 0-d array: flag 1
    {"array": "int32", "value": [[0, 1, 2], [3, 4, 5]]},
    [],
    [12345678.0, 1.0, -3.25, 0.1],
]


def make_cases(load_photo) -> dict[str, dict]:
    rng = np.random.default_rng(2024)
    cases: dict[str, dict] = {}

    def add(name, bodies, headers=None, indexed=True):
        keys = [int(k) for k in rng.permutation(10 * len(bodies) + 10)[: len(bodies)]]
        cases[name] = {"keys": keys, "headers": headers or [None] * len(bodies), "bodies": bodies, "indexed": indexed}

    add("random", [_random(rng, int(n)) for n in [*range(0, 40), *rng.integers(100, 9000, 40)]])
    add(
        "magic",
        [
            M,
            M + M,
            M + b"x",
            M + b"abc",
            b"abcd" + M,
            b"abcd" + M + M + M + b"efgh",
            M + b"abcd" + M + b"e",
            b"a" + M + b"bcd",  # unaligned: not cut
            b"ab" + M + b"c",
            b"abc" + M,
            b"abcd" + M[:3],
            M * 64,
            b"",
        ],
    )
    short = [_words_with_magic(rng, int(rng.integers(0, 40)), 0.3, i % 4) for i in range(120)]
    long = [_words_with_magic(rng, int(rng.integers(64, 4000)), 0.002, i % 4) for i in range(40)]
    add("magic_random", short + long)
    big = bytearray(_random(rng, 6 * 2**20 + 3))
    for off in (0, 4, 2**20, 3 * 2**20 + 12, 6 * 2**20 - 4, 777):  # 777 is unaligned: not cut
        big[off : off + 4] = M
    add("large", [b"small", bytes(big), _random(rng, 3 * 2**20), b"end"])
    add("empty", [b"", b"", b"x", b""])
    add("sequential", [_random(rng, n) for n in (0, 1, 2, 3, 4, 5, 1000)] + [M + b"zz" + M], indexed=False)
    headers = [[0, label, int(rng.integers(0, 2**63)) * 2 + 1, i] for i, label in enumerate(LABELS)]
    headers[0][0] = 5  # a flag with a scalar label is overwritten with 0
    headers[1][2] = 2**64 - 1
    add("labels", [_random(rng, i) for i in range(len(LABELS))], headers)
    bodies = [M, b"abcd" + M, M + b"xyz", _random(rng, 7) + M + _random(rng, 9), b"abcdefgh" + M]  # aligned in payload
    add("magic_in_bodies", bodies, [[0, lab, i, 0] for i, lab in enumerate([1.0, [2, 1], [3, 1, 4], 4, []])])
    jpegs = _face_jpegs(load_photo)
    add("jpeg", jpegs, [[0, [i, 1.0] if i % 2 else i, i + 1, 0] for i in range(len(jpegs))])
    return cases


CASES = ["random", "magic", "magic_random", "large", "empty", "sequential", "labels", "magic_in_bodies", "jpeg"]
PACKED = ["labels", "magic_in_bodies", "jpeg"]


def _payload(header, body: bytes) -> bytes:
    if header is None:
        return body
    flag, label, id_, id2 = header
    return recordio.pack(IRHeader(flag, mxnet_env.make_label(label), id_, id2), body)


def _write_ours(case: dict, rec: Path, idx: Path) -> list[bytes]:
    payloads = [_payload(h, b) for h, b in zip(case["headers"], case["bodies"], strict=True)]
    if case["indexed"]:
        with MXIndexedRecordIO(idx, rec, "w") as w:
            for key, p in zip(case["keys"], payloads, strict=True):
                w.write_idx(key, p)
    else:
        with MXRecordIO(rec, "w") as w:
            for p in payloads:
                w.write(p)
    return payloads


def _expected_header(spec: list) -> list:
    """What unpack should give for a header written with pack: a number stays in the header (flag 0); anything
    else becomes flag = size, float32 labels (an empty list: flag 0, label 0)."""
    _flag, label, id_, id2 = spec
    label = mxnet_env.make_label(label)
    if isinstance(label, numbers.Number):
        return [0, float(np.float32(label)), id_, id2]
    values = np.asarray(label, np.float32).ravel()
    return [values.size, values.tolist(), id_, id2] if values.size else [0, 0.0, id_, id2]


def _split(blob: bytes, lengths: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in lengths:
        out.append(blob[pos : pos + n])
        pos += n
    assert pos == len(blob)
    return out


@pytest.fixture(scope="module")
def cross(mxnet_python, tmp_path_factory, load_photo) -> dict:
    """Write every case with ours and with mxnet, have mxnet read ours, in one run of the mxnet driver."""
    tmp = tmp_path_factory.mktemp("mxnet_cross")
    cases = make_cases(load_photo)
    jobs, out = [], {}
    for name, case in cases.items():
        d = tmp / name
        d.mkdir()
        blob = d / "bodies.bin"
        blob.write_bytes(b"".join(case["bodies"]))
        ours = {"rec": str(d / "ours.rec"), "idx": str(d / "ours.idx") if case["indexed"] else None}
        mx = {"rec": str(d / "mx.rec"), "idx": str(d / "mx.idx") if case["indexed"] else None}
        payloads = _write_ours(case, Path(ours["rec"]), Path(ours["idx"] or d / "unused"))
        jobs.append(
            {
                "op": "write",
                **mx,
                "blob": str(blob),
                "lengths": [len(b) for b in case["bodies"]],
                "keys": case["keys"],
                "headers": case["headers"],
                "packed_out": str(d / "mx_packed.bin"),
            }
        )
        jobs.append({"op": "read", **ours, "out_blob": str(d / "mx_read.bin"), "unpack": name in PACKED})
        out[name] = {"case": case, "payloads": payloads, "ours": ours, "mx": mx, "dir": d}
    results = mxnet_env.run_jobs(mxnet_python, jobs, tmp)
    for i, name in enumerate(cases):
        out[name]["mx_write"], out[name]["mx_read"] = results[2 * i], results[2 * i + 1]
    return out


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", CASES)
def test_files_are_byte_identical(cross, name):
    c = cross[name]
    ours, mx = Path(c["ours"]["rec"]), Path(c["mx"]["rec"])
    assert ours.stat().st_size == mx.stat().st_size
    assert ours.read_bytes() == mx.read_bytes()
    if c["case"]["indexed"]:
        assert Path(c["ours"]["idx"]).read_text() == Path(c["mx"]["idx"]).read_text()
        offsets = [int(line.split("\t")[1]) for line in Path(c["ours"]["idx"]).read_text().splitlines()]
        assert offsets == c["mx_write"]["tells"]  # mxnet's tell() before each write_idx
    packed = _split(Path(c["dir"] / "mx_packed.bin").read_bytes(), c["mx_write"]["packed_lengths"])
    assert packed == c["payloads"]  # mxnet's pack() == ours, byte for byte


def test_cases_cover_split_records(cross):
    """The cases do contain records that are split, in several places (else the comparisons prove little)."""
    split = 0
    for name in ("magic", "magic_random", "large", "sequential", "magic_in_bodies"):
        for p in cross[name]["payloads"]:
            parts = len(recordio._encode_parts(p)[0]) // 2
            split += parts > 1
    assert split > 50
    assert len(recordio.encode_record(cross["large"]["payloads"][1])) > 6 * 2**20


@pytest.mark.parametrize("name", CASES)
def test_mxnet_reads_ours(cross, name):
    c, r = cross[name], cross[name]["mx_read"]
    n = len(c["payloads"])
    read = _split(Path(c["dir"] / "mx_read.bin").read_bytes(), r["seq_lengths"] + r["key_lengths"])
    assert read[:n] == c["payloads"]  # every record, in sequence, until read() returned None
    if c["case"]["indexed"]:
        assert r["keys"] == c["case"]["keys"]
        assert read[n:] == c["payloads"]  # and each by read_idx(key)
    if name in PACKED:
        for header_mx, body_len, payload in zip(r["headers"], r["body_lengths"], c["payloads"], strict=True):
            header, body = recordio.unpack(payload)
            assert header_mx == mxnet_env.header_json(header)
            assert body_len == len(body)


@pytest.mark.parametrize("name", CASES)
def test_we_read_mxnets(cross, name):
    c = cross[name]
    if c["case"]["indexed"]:
        with MXIndexedRecordIO(c["mx"]["idx"], c["mx"]["rec"], "r") as r:
            assert r.keys == c["case"]["keys"]
            assert [r.read_idx(k) for k in reversed(r.keys)] == c["payloads"][::-1]
    with MXRecordIO(c["mx"]["rec"], "r") as r:
        got = []
        while (p := r.read()) is not None:
            got.append(p)
    assert got == c["payloads"]
    if name in PACKED:
        expected = c["mx_read"]["headers"]  # what mxnet unpacked from the same bytes
        assert [mxnet_env.header_json(recordio.unpack(p)[0]) for p in got] == expected
        assert expected == [_expected_header(h) for h in c["case"]["headers"]]  # mxnet's documented semantics
        assert [recordio.unpack(p)[1] for p in got] == c["case"]["bodies"]


def test_pack_img_unpack_img_agree(mxnet_python, tmp_path, load_photo):
    rgb = load_photo("astronaut")[60:260, 160:360]
    bgr = np.ascontiguousarray(cv2.resize(rgb, (112, 112))[:, :, ::-1])
    np.save(tmp_path / "img.npy", bgr)
    header = [0, [7, 1], 42, 0]
    ours = recordio.pack_img(IRHeader(0, [7, 1], 42, 0), bgr, 95, ".jpg")
    (tmp_path / "ours.bin").write_bytes(ours)
    jobs = [
        {"op": "img", "image": str(tmp_path / "img.npy"), "header": header, "quality": 95, "img_fmt": ".jpg"}
        | {"packed_out": str(tmp_path / "mx.bin")},
        {"op": "img", "payload": str(tmp_path / "ours.bin"), "image_out": str(tmp_path / "mx_of_ours.npy")},
        {"op": "img", "payload": str(tmp_path / "mx.bin"), "image_out": str(tmp_path / "mx_of_mx.npy")},
    ]
    png = recordio.pack_img(IRHeader(0, 3.0, 1, 0), bgr, 3, ".png")
    (tmp_path / "png.bin").write_bytes(png)
    jobs.append({"op": "img", "payload": str(tmp_path / "png.bin"), "image_out": str(tmp_path / "mx_png.npy")})
    results = mxnet_env.run_jobs(mxnet_python, jobs, tmp_path)
    mx = (tmp_path / "mx.bin").read_bytes()
    assert mx[:32] == ours[:32]  # same header and labels; the JPEG bytes come from two OpenCV versions
    h_ours, img_ours = recordio.unpack_img(ours)
    h_mx, img_mx = recordio.unpack_img(mx)
    assert mxnet_env.header_json(h_ours) == mxnet_env.header_json(h_mx) == results[1]["header"] == [2, [7, 1], 42, 0]
    assert np.array_equal(np.load(tmp_path / "mx_of_ours.npy"), img_ours)  # both decode our record alike
    assert np.array_equal(np.load(tmp_path / "mx_of_mx.npy"), img_mx)  # and mxnet's
    assert np.abs(img_ours.astype(int) - img_mx).mean() < 1.0  # the two encoders agree closely
    assert np.abs(img_ours.astype(int) - bgr).mean() < 3.0  # BGR in, BGR out, in both
    assert np.array_equal(np.load(tmp_path / "mx_png.npy"), bgr)  # lossless: exact, no channel swap


# ------------------------------------------------------------------------- a DatasetWriter dataset in mxnet


def test_mxnet_reads_datasetwriter_output_like_insightface(mxnet_python, tmp_path, load_photo):
    layout = pytest.importorskip("packer.layout", reason="packer.layout (DatasetWriter) is not written yet")
    jpegs = _face_jpegs(load_photo)
    groups = {"alice": jpegs[:3], "bob": jpegs[3:] + jpegs[:1], "carol": jpegs[1:3]}
    jobs, expected = [], {}
    for style in ("scalar", "pair"):
        out = tmp_path / style
        with layout.DatasetWriter(out, layout="insightface", label_style=style) as writer:
            for group, bodies in groups.items():
                for i, body in enumerate(bodies):
                    writer.add(layout.PackItem(group=group, body=body, source=f"{group}/{i}.jpg"))
        expected[style] = [(label, body) for label, bodies in enumerate(groups.values()) for body in bodies]
        jobs.append(
            {"op": "insightface_read", "rec": str(out / "train.rec"), "idx": str(out / "train.idx")}
            | {"out_blob": str(tmp_path / f"{style}.bin"), "decode": 2}
        )
    results = mxnet_env.run_jobs(mxnet_python, jobs, tmp_path)

    for style, res in zip(("scalar", "pair"), results, strict=True):
        want = expected[style]
        n, k = len(want), len(groups)
        assert res["header0"][:2] == [2, [n + 1, n + 1 + k]]  # key 0: flag 2, [N+1, N+1+K]
        assert [it["key"] for it in res["items"]] == list(range(1, n + 1))
        assert [it["label"] for it in res["items"]] == [float(label) for label, _ in want]
        flags = {it["header"][0] for it in res["items"]}
        assert flags == ({0} if style == "scalar" else {2})
        bodies = _split(Path(tmp_path / f"{style}.bin").read_bytes(), [it["body_length"] for it in res["items"]])
        assert bodies == [body for _, body in want]
        # mx.image.imdecode (what training uses) gives RGB: the same colours as OpenCV's BGR decode, reversed
        # (the crops are of a colour photo, so a channel swap would show)
        assert len(res["rgb_means"]) == 2
        for mean, (_, body) in zip(res["rgb_means"], want, strict=False):
            bgr = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert np.allclose(mean, bgr.reshape(-1, 3).mean(0)[::-1], atol=1.0)
            assert max(mean) - min(mean) > 5
        assert sorted(res["keys"]) == list(range(n + k + 1))
        # and the same training code with packer.recordio instead of mxnet's gets the same
        out = tmp_path / style
        ours, our_bodies = mxnet_env.read_like_insightface(recordio, str(out / "train.idx"), str(out / "train.rec"))
        assert ours == {key: v for key, v in res.items() if key != "rgb_means"} and our_bodies == bodies
        with MXIndexedRecordIO(out / "train.idx", out / "train.rec", "r") as r:  # identity records [start, end)
            ranges = [recordio.unpack(r.read_idx(n + 1 + i))[0].label.tolist() for i in range(k)]
        assert ranges == [[1, 4], [4, 6], [6, 8]]  # alice 3 images, bob 2, carol 2
