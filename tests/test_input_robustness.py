"""Input robustness (issue 8, items 1, 2, 5, 6, and two of item 10): nothing hangs or blows up memory, one bad path
never stops a scan, `pack` decodes what it stores, landmarks are validated, EXIF LONG orientation, numeric identity
order. Real files on disk (FIFOs, sockets, symlink loops, sparse files), real subprocesses with timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from badfiles import black_png, exif_long_orientation, tiny_jpeg_claiming, zeroed_scan_jpeg
from PIL import Image, ImageOps

from gpu_align.decode import dali_available, make_decoder
from gpu_align.scan import scan_source
from packer import recordio
from packer.cli import run as packer_run
from packer.errors import UserError
from packer.lst import LstEntry, format_lst_line, landmark_problem, landmarks_outside, read_lst
from packer.scan import scan_folder

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["cpu", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali"))]
LM = (38.29, 73.53, 56.03, 41.55, 70.73, 51.70, 51.50, 71.74, 92.37, 92.20)  # the ArcFace template, x then y


def _crop(seed: int) -> bytes:
    """A 112×112 JPEG with real structure (a shifted crop of the astronaut photo)."""
    from gpu_align.demo import photos

    img = photos.load_rgb("astronaut")[seed * 7 : seed * 7 + 224, 150 + seed * 5 : 374 + seed * 5]
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (112, 112))[..., ::-1])
    assert ok
    return buf.tobytes()


def _pack(lst: Path, out: Path, *extra: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m packer pack` in a subprocess (a hang fails on the timeout); also proves torch is never imported."""
    code = (
        "import sys; from packer.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n    assert 'torch' not in sys.modules, 'the packer imported torch'\n"
    )
    cmd = [sys.executable, "-c", code, "pack", str(lst), "--out", str(out), "-q", *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert "the packer imported torch" not in res.stderr
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return res, {s["path"]: s["reason"] for s in report.get("skipped", [])}


# ------------------------------------------------------------------------------------------ item 1: pack inputs


def test_pack_refuses_fifo_device_dir_socket_and_oversized_files_without_blocking(tmp_path):
    d = tmp_path / "crops"
    d.mkdir()
    good = [d / f"{k}.jpg" for k in range(3)]
    for k, p in enumerate(good):
        p.write_bytes(_crop(k))
    fifo = d / "pipe.jpg"
    os.mkfifo(fifo)  # no writer: a plain open() blocks forever
    sock_path = d / "sock.jpg"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    zero_link = d / "zero.jpg"
    zero_link.symlink_to("/dev/zero")  # a read() never ends
    big = d / "big.jpg"
    with open(big, "wb") as f:  # sparse 65 MiB file that starts like a JPEG
        f.write(_crop(0))
        f.truncate(65 << 20)
    folder = d / "folder.jpg"
    folder.mkdir()
    bad = [fifo, sock_path, zero_link, Path("/dev/zero"), folder, big]
    lst = tmp_path / "in.lst"
    lst.write_text("".join(f"1\t{p}\t0\n" for p in [good[0], *bad, *good[1:]]))
    try:
        res, reasons = _pack(lst, tmp_path / "out")
    finally:
        sock.close()
    assert res.returncode == 0, res.stderr
    for p in (fifo, sock_path, zero_link, Path("/dev/zero"), folder):
        assert reasons[str(p)] == "unreadable: not a regular file", p
    assert reasons[str(big)] == "too large: file is 65.0 MiB (limit 64 MiB)"
    with recordio.MXIndexedRecordIO(str(tmp_path / "out/train.idx"), str(tmp_path / "out/train.rec"), "r") as r:
        bodies = [recordio.unpack(r.read_idx(k))[1] for k in range(1, 4)]
    assert bodies == [p.read_bytes() for p in good]


# ------------------------------------------------------------------------------------------ item 5: pack decodes


def test_pack_skips_truncated_and_corrupt_crops(tmp_path):
    d = tmp_path / "crops"
    d.mkdir()
    crop = _crop(1)
    files = {
        "good.jpg": crop,
        "cut.jpg": crop[: len(crop) * 2 // 3],  # header intact, no end marker
        "cut_eoi.jpg": crop[: len(crop) // 2] + b"\xff\xd9",  # end marker glued on: data runs out early
        "zeroed.jpg": zeroed_scan_jpeg(crop, 300),  # libjpeg-turbo only warns on this one
        "cut.png": cv2.imencode(".png", np.full((112, 112, 3), 90, np.uint8))[1].tobytes()[:-30],
        "good2.jpg": _crop(2),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    lst = tmp_path / "in.lst"
    lst.write_text("".join(f"1\t{d / n}\t0\n" for n in files))
    res, reasons = _pack(lst, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    short = {Path(p).name: r for p, r in reasons.items()}
    # the header probe `run`'s decoders use: the same reason for the same file in `pack` and in `run`
    assert short["cut.jpg"].startswith("truncated: JPEG has no end-of-image marker"), short
    assert short["cut_eoi.jpg"].startswith("corrupt: Corrupt JPEG data"), short
    assert short["zeroed.jpg"].startswith("corrupt: Corrupt JPEG data"), short
    assert short["cut.png"].startswith("truncated: PNG has no IEND"), short
    assert set(short) == {"cut.jpg", "cut_eoi.jpg", "zeroed.jpg", "cut.png"}
    lines = (tmp_path / "out/train.lst").read_text().splitlines()
    assert [Path(ln.split("\t")[1]).name for ln in lines] == ["good.jpg", "good2.jpg"]


# ------------------------------------------------------------------------------------------ item 1: decode


@pytest.mark.parametrize("kind", BACKENDS)
def test_damaged_jpeg_data_is_corrupt_and_tiny_bombs_are_refused(kind, tmp_path):
    crop = _crop(3)
    files = {
        "good.jpg": crop,
        "zeroed.jpg": zeroed_scan_jpeg(crop, 300),
        "claims_10000.jpg": tiny_jpeg_claiming(10000, 10000),
        "claims_6000.jpg": tiny_jpeg_claiming(6000, 6000),
    }
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    with make_decoder(kind, batch_size=8) as dec:
        b = dec.decode_paths(paths)
    assert b.indices == [0]
    got = {paths[i].name: r for i, _, r in b.failures}
    assert got["zeroed.jpg"].startswith("corrupt: JPEG: Corrupt JPEG data"), got
    assert got["claims_10000.jpg"].startswith("too large: 10000x10000 (100.0 MP) > max_pixels (40.0 MP)"), got
    assert got["claims_6000.jpg"].startswith("truncated:") and "cannot hold 6000x6000" in got["claims_6000.jpg"]


_RSS_PROBE = """
import json, resource, sys
from gpu_align.decode import make_decoder
with make_decoder("cpu", batch_size=4) as dec:
    dec.decode_paths([sys.argv[1]])  # warm up: libraries, thread pool
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = dec.decode_paths(sys.argv[2:])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([len(b.indices), [r.split(":")[0] for _, _, r in b.failures], (after - before) // 1024]))
"""


def test_decompression_bombs_cost_no_memory(tmp_path):
    """The issue's two bombs (a few-hundred-byte JPEG and a ~100 KB black PNG, both claiming 10000×10000, which
    took 5.2 GB peak in a run before) are refused from their headers: peak RSS grows by < 60 MB."""
    good = tmp_path / "good.jpg"
    good.write_bytes(_crop(0))
    jpg, png = tmp_path / "bomb.jpg", tmp_path / "bomb.png"
    jpg.write_bytes(tiny_jpeg_claiming(10000, 10000))
    png.write_bytes(black_png(10000, 10000))
    assert len(jpg.read_bytes()) < 1000 and len(png.read_bytes()) < 300_000
    res = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(good), str(jpg), str(png), str(good)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    n_ok, reasons, grew_mb = json.loads(res.stdout.strip().splitlines()[-1])
    assert n_ok == 1 and reasons == ["too large", "too large"]
    assert grew_mb < 60, f"peak RSS grew by {grew_mb} MB"


# ------------------------------------------------------------------------------------------ item 10: EXIF LONG


@pytest.mark.parametrize("kind", BACKENDS)
def test_exif_orientation_of_type_long_is_applied_like_pillow(kind, tmp_path):
    from gpu_align.demo import photos

    img = np.ascontiguousarray(photos.load_rgb("astronaut")[:200, 100:350])  # (200, 250): shape shows the turn
    plain = cv2.imencode(".jpg", img[..., ::-1])[1].tobytes()
    paths = []
    for o in (3, 6, 8):
        paths.append(tmp_path / f"long{o}.jpg")
        paths[-1].write_bytes(exif_long_orientation(plain, o))
    with make_decoder(kind) as dec:
        b = dec.decode_paths(paths)
    assert not b.failures
    for p, im in zip(paths, b.images, strict=True):
        with Image.open(p) as pil:
            assert pil.getexif()[0x0112] == int(p.stem[4:])  # Pillow reads the LONG tag
            ref = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
        assert im.shape == ref.shape != img.shape or p.stem == "long3"
        assert np.array_equal(im.numpy(), ref), p.name


# ------------------------------------------------------------------------------------------ item 2: scans


def _bad_tree(root: Path, jpeg: bytes) -> dict[str, str]:
    """An identity folder full of paths that break naive scans; returns {relative path: expected reason}."""
    a = root / "alice"
    a.mkdir(parents=True)
    (a / "ok.jpg").write_bytes(jpeg)
    (a / "loop.jpg").symlink_to("loop.jpg")  # ELOOP
    (a / "through.jpg").symlink_to("ok.jpg/x.jpg")  # ENOTDIR
    (a / "long.jpg").symlink_to("x" * 300)  # ENAMETOOLONG
    (a / "dangling.jpg").symlink_to("gone.jpg")  # ENOENT
    (a / "loopdir").symlink_to("loopdir")  # a loop without an image extension
    os.mkfifo(a / "pipe.jpg")
    (a / "tab\tname.jpg").write_bytes(jpeg)
    (a / "new\nline.jpg").write_bytes(jpeg)
    (a / "cr\r.jpg").write_bytes(jpeg)
    (root / "bob").mkdir()
    (root / "bob" / "1.jpg").write_bytes(jpeg)
    (root / "loop_identity").symlink_to("loop_identity")  # at the identity level too
    (root / "through_identity").symlink_to("bob/1.jpg/x")
    (root / "tab\tidentity").mkdir()
    (root / "tab\tidentity" / "1.jpg").write_bytes(jpeg)
    expected = {
        "alice/loop.jpg": "unreadable: symlink loop",
        "alice/through.jpg": "unreadable: link through a file (a path component is not a folder)",
        "alice/long.jpg": "unreadable: name or link target too long",
        "alice/dangling.jpg": "unreadable: broken link (its target does not exist)",
        "alice/loopdir": "unreadable: symlink loop",
        "alice/pipe.jpg": "unreadable: not a regular file",
        "alice/tab\tname.jpg": "path contains a tab/newline (a tab-separated .lst line cannot hold it)",
        "alice/new\nline.jpg": "path contains a tab/newline (a tab-separated .lst line cannot hold it)",
        "alice/cr\r.jpg": "path contains a tab/newline (a tab-separated .lst line cannot hold it)",
        "loop_identity": "unreadable: symlink loop",
        "through_identity": "unreadable: link through a file (a path component is not a folder)",
        "tab\tidentity": "path contains a tab/newline (a tab-separated .lst line cannot hold it)",
    }
    locked = root / "locked"
    locked.mkdir()
    (locked / "1.jpg").write_bytes(jpeg)
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # root reads it anyway
        expected["locked"] = "unreadable: cannot list folder (permission denied)"
    return expected


def test_scan_skips_every_bad_path_with_a_reason(tmp_path):
    root = tmp_path / "root"
    expected = _bad_tree(root, _crop(0))
    try:
        res = scan_folder(root, absolute=False)
        src = scan_source(root)  # what `gpu-align run` scans
    finally:
        (root / "locked").chmod(0o755)
    paths = [e.path for e in res.entries]
    assert paths[:2] == ["alice/ok.jpg", "bob/1.jpg"] and len(paths) == (2 if "locked" in expected else 3)
    assert dict(res.skipped) == expected
    assert [it.path for it in src.items][:2] == [str(root / "alice/ok.jpg"), str(root / "bob/1.jpg")]
    assert {os.path.relpath(p, root): r for p, r in src.skipped} == expected


def test_lst_command_reports_bad_paths_and_writes_clean_columns(tmp_path):
    root = tmp_path / "root"
    expected = _bad_tree(root, _crop(0))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "packer", "lst", str(root), "-o", str(tmp_path / "out.lst")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        (root / "locked").chmod(0o755)
    assert res.returncode == 0, res.stderr
    assert f"skipped {len(expected)}:" in res.stdout and "Traceback" not in res.stderr
    assert "unreadable" in res.stdout and "path contains a tab/newline" in res.stdout
    for line in (tmp_path / "out.lst").read_text().splitlines():
        assert len(line.split("\t")) == 3, line
    assert len(list(read_lst(tmp_path / "out.lst"))) == (2 if "locked" in expected else 3)


def test_root_with_a_tab_or_newline_is_a_clear_error(tmp_path):
    for bad in ("with\ttab", "with\nnewline"):
        root = tmp_path / bad
        (root / "a").mkdir(parents=True)
        (root / "a" / "1.jpg").write_bytes(_crop(0))
        with pytest.raises(UserError, match=r"path contains a tab/newline.*rename or move the folder"):
            scan_folder(root)
        with pytest.raises(UserError, match="path contains a tab/newline"):
            scan_source(root)
        res = subprocess.run(
            [sys.executable, "-m", "packer", "lst", str(root), "-o", str(tmp_path / "x.lst")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr and "tab/newline" in res.stderr, res.stderr
        # --relative with the .lst inside ROOT never writes ROOT's name: that works
        assert packer_run(["lst", str(root), "-o", str(root / "in.lst"), "--relative", "-q"]) == 0
        assert (root / "in.lst").read_text() == "1\ta/1.jpg\t0\n"


# ------------------------------------------------------------------------------------------ item 10: numeric order


def test_numeric_identity_names_sort_by_number_others_by_string(tmp_path):
    jpeg = _crop(0)
    num, mixed = tmp_path / "num", tmp_path / "mixed"
    for name in ("0", "1", "2", "10", "11", "9"):
        (num / name).mkdir(parents=True)
        (num / name / "1.jpg").write_bytes(jpeg)
    for name in ("1", "10", "2", "b"):
        (mixed / name).mkdir(parents=True)
        (mixed / name / "1.jpg").write_bytes(jpeg)
    (num / "notes.txt").write_text("files beside identities do not count")
    (num / ".hidden").mkdir()
    assert scan_folder(num).identities == ["0", "1", "2", "9", "10", "11"]
    assert scan_source(num).items[3].group == "9"  # `run` labels by the same order
    assert scan_folder(mixed).identities == ["1", "10", "2", "b"]  # not all numbers: string order, as always
    zero_padded = tmp_path / "padded"
    for name in ("0000045", "0000100", "0000002"):
        (zero_padded / name).mkdir(parents=True)
        (zero_padded / name / "1.jpg").write_bytes(jpeg)
    assert scan_folder(zero_padded).identities == ["0000002", "0000045", "0000100"]  # CASIA-style: unchanged


def test_unpack_lst_pack_keeps_labels(tmp_path):
    """12 identities (labels 0..11: two-digit labels) packed, unpacked, listed and packed again: every image keeps
    its label. Also with the un-padded folder names (`IMGDIR/<label>/<key>.jpg`) older unpacks wrote."""
    src = tmp_path / "src"
    for k in range(24):
        (src / f"id{k // 2:02d}").mkdir(parents=True, exist_ok=True)
        (src / f"id{k // 2:02d}" / f"{k % 2}.jpg").write_bytes(_crop(k))
    assert packer_run(["lst", str(src), "-o", str(tmp_path / "a.lst"), "-q"]) == 0
    assert packer_run(["pack", str(tmp_path / "a.lst"), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert packer_run(["unpack", str(tmp_path / "a"), "--out", str(tmp_path / "img")]) == 0
    unpadded = tmp_path / "unpadded"
    for d in (tmp_path / "img").iterdir():
        (unpadded / str(int(d.name))).mkdir(parents=True)
        for f in d.iterdir():
            (unpadded / str(int(d.name)) / f.name).write_bytes(f.read_bytes())

    def labels(out: Path) -> dict[bytes, int]:
        with recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "r") as r:
            header0, _ = recordio.unpack(r.read_idx(0))
            recs = [recordio.unpack(r.read_idx(k)) for k in range(1, int(header0.label[0]))]
        return {body: int(h.label) for h, body in recs}

    want = labels(tmp_path / "a")
    assert sorted(set(want.values())) == list(range(12))
    for name in ("img", "unpadded"):
        assert packer_run(["lst", str(tmp_path / name), "-o", str(tmp_path / f"{name}.lst"), "-q"]) == 0
        assert packer_run(["pack", str(tmp_path / f"{name}.lst"), "--out", str(tmp_path / f"{name}_rec"), "-q"]) == 0
        assert labels(tmp_path / f"{name}_rec") == want, name


# ------------------------------------------------------------------------------------------ item 6: landmarks


def test_landmark_checks():
    assert landmark_problem(LM) is None
    assert "not finite in float32" in landmark_problem((1e39, *LM[1:]))  # finite as a Python float
    assert "not finite in float32" in landmark_problem((float("nan"), *LM[1:]))
    assert "eyes on one point" in landmark_problem((50, 50, 56, 41, 70, 51, 51, 71, 92, 92))
    assert "eyes on one point" in landmark_problem((7.0,) * 10)
    line = (10, 20, 30, 40, 50, 10, 20, 30, 40, 50)  # on y = x
    assert "all five points on one line" in landmark_problem(line)
    assert landmarks_outside(LM, 112, 112) is None
    assert landmarks_outside([x - 60 for x in LM[:5]] + list(LM[5:]), 112, 112) is None  # within one IOD
    far = [x + 200 for x in LM[:5]] + list(LM[5:])
    why = landmarks_outside(far, 112, 112)
    assert "left eye at (238.3, 51.7) is more than one inter-ocular distance (35.2 px)" in why
    for bad in (float("inf"), float("nan"), 1e39):
        with pytest.raises(ValueError, match="not finite in float32"):
            format_lst_line(LstEntry(0, "/a.jpg", 0, (0, 0, 10, 10), (bad, *LM[1:])))
        with pytest.raises(ValueError, match="not finite in float32"):
            format_lst_line(LstEntry(0, "/a.jpg", 0, (0, 0, bad, 10)))  # a box alone too


def _lm_line(aligned: int, path: Path, label: int, lm, box=(0, 0, 112, 112)) -> str:
    return "\t".join([str(aligned), str(path), str(label), *map(str, box), *map(str, lm)]) + "\n"


def test_lst_lines_with_bad_landmarks_are_read_and_marked(tmp_path):
    p = tmp_path / "x.lst"
    p.write_text(
        _lm_line(0, Path("/a.jpg"), 0, LM)
        + _lm_line(0, Path("/b.jpg"), 0, ("1e39", *LM[1:]))
        + _lm_line(0, Path("/c.jpg"), 0, ("nan", *LM[1:]))
        + _lm_line(0, Path("/d.jpg"), 0, (5.0,) * 10)
        + _lm_line(0, Path("/e.jpg"), 0, LM, box=(0, 0, "inf", 112))
    )
    a, b, c, d, e = read_lst(p)
    assert a.bad_landmarks is None and a.landmarks == pytest.approx(LM)
    assert b.bad_landmarks.startswith("bad landmarks: not finite in float32") and b.landmarks is None
    assert c.bad_landmarks.startswith("bad landmarks: not finite in float32")
    assert d.bad_landmarks.startswith("bad landmarks: eyes on one point")
    assert e.bad_landmarks.startswith("bad landmarks: face box") and e.bbox is None


def test_pack_skips_aligned_crops_with_bad_landmarks(tmp_path):
    paths = [tmp_path / f"{k}.jpg" for k in range(3)]
    for k, p in enumerate(paths):
        p.write_bytes(_crop(k))
    lst = tmp_path / "in.lst"
    bad = ("1e39", *LM[1:])
    lst.write_text(_lm_line(1, paths[0], 0, LM) + _lm_line(1, paths[1], 0, bad) + _lm_line(1, paths[2], 0, LM))
    res, reasons = _pack(lst, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert list(reasons) == [str(paths[1])] and reasons[str(paths[1])].startswith("bad landmarks: not finite")
    text = (tmp_path / "out/train.lst").read_text()
    assert text.count("\n") == 2 and "inf" not in text and "nan" not in text


@pytest.mark.slow
def test_run_skips_photos_with_bad_landmarks(tmp_path, load_photo):
    """`gpu-align run` of a .lst with landmarks: good lines are warped; nan/1e39/degenerate landmarks and points far
    outside the photo are reported as "bad landmarks", with no crop stored and no detection instead."""
    from gpu_align.pipeline import RunOptions, run

    img = load_photo("astronaut")
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(cv2.imencode(".jpg", img[..., ::-1])[1].tobytes())
    face = (185, 246, 218, 186, 242, 126, 121, 160, 195, 193)  # roughly the astronaut's eyes, nose, mouth
    outside = tuple(x + 2000 for x in face[:5]) + face[5:]
    lines = [face, ("1e39", *face[1:]), ("nan", *face[1:]), (200.0,) * 10, outside, face]
    lst = tmp_path / "photos.lst"
    lst.write_text("".join(_lm_line(0, photo, 0, lm, box=(150, 80, 280, 240)) for lm in lines))
    out = tmp_path / "out"
    result = run(RunOptions(src=str(lst), out=str(out), device="cpu", decoder="cpu", batch_size=8, quiet=True))
    assert result.found == 2 and result.failed == 4
    report = json.loads((out / "report.json").read_text())
    reasons = [s["reason"] for s in report["skipped"]]
    assert len(reasons) == 4 and all(r.startswith("bad landmarks: ") for r in reasons), reasons
    assert any("more than one inter-ocular distance" in r and "512x512 photo" in r for r in reasons)
    text = (out / "train.lst").read_text()
    assert text.count("\n") == 2 and "inf" not in text and "nan" not in text
