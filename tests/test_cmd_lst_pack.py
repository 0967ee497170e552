"""`gpu-align lst` and `gpu-align pack` end to end: real JPEG crops on disk, real subprocesses killed with SIGKILL,
a real size limit / full disk, and the files read back with packer.recordio."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import pytest

from packer.cli import run
from packer.layout import STATE_NAME
from tests.cli_helpers import REPO, one_error_line, records, run_module, start
from tests.pack_gate import Gate

# ------------------------------------------------------------------------------------------------ fixtures


def _crops(load_photo, n: int, size: int = 112) -> list[bytes]:
    """``n`` real face-photo crops (sliding windows over shipped photos) as JPEG bytes."""
    out = []
    photos = [load_photo(name) for name in ("astronaut", "t1", "tom_hanks")]
    i = 0
    while len(out) < n:
        img = photos[i % 3]
        h, w = img.shape[:2]
        s = min(h, w) // 2
        y, x = (i * 37) % (h - s), (i * 53) % (w - s)
        ok, buf = cv2.imencode(".jpg", cv2.resize(img[y : y + s, x : x + s], (size, size))[..., ::-1])
        assert ok
        out.append(buf.tobytes())
        i += 1
    return out


@pytest.fixture(scope="module")
def faces(tmp_path_factory, load_photo) -> Path:
    """faces/id00..id23/000..004.jpg (120 real 112×112 crops) and faces.lst (absolute paths, from `lst`)."""
    base = tmp_path_factory.mktemp("faces")
    root = base / "faces"
    for k, data in enumerate(_crops(load_photo, 120)):
        d = root / f"id{k // 5:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k % 5:03d}.jpg").write_bytes(data)
    assert run(["lst", str(root), "-o", str(base / "faces.lst"), "-q"]) == 0
    return base


def _files(d: Path) -> dict[str, bytes]:
    """The dataset's files; report.html is a page for people (it names DIR and its own build time)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "report.html"}


def _pack(lst, out, *extra, **kw) -> subprocess.CompletedProcess[str]:
    """``python -m packer pack LST --out OUT -q EXTRA...`` run to its end (``kw``: to ``run_module``)."""
    return run_module("packer", "pack", lst, "--out", out, "-q", *extra, **kw)


# ------------------------------------------------------------------------------------------------ lst


def test_lst_writes_sorted_face2rec2_lines_and_summary(faces, tmp_path, capsys):
    root = faces / "faces"
    (root / "id00" / "notes.txt").write_text("not an image")
    (root / "id99").mkdir()
    (root / "id99" / "only.jpg").write_bytes((root / "id00" / "000.jpg").read_bytes())
    try:
        out = tmp_path / "train.lst"
        assert run(["lst", str(root), "-o", str(out), "--min-images", "2"]) == 0
        lines = out.read_text().splitlines()
        printed = capsys.readouterr().out
    finally:
        (root / "id00" / "notes.txt").unlink()
        (root / "id99" / "only.jpg").unlink()
        (root / "id99").rmdir()
    assert len(lines) == 120
    assert lines[0] == f"1\t{root}/id00/000.jpg\t0" and lines[-1] == f"1\t{root}/id23/004.jpg\t23"
    assert f"{out}: 24 identities, 120 images (absolute paths, aligned=1); skipped 2: " in printed
    assert "1 fewer than min_images=2 images" in printed and "1 not an image" in printed
    assert f"skipped {root}/id99: fewer than min_images=2 images (identity has 1)" in printed


def test_lst_relative_paths_are_relative_to_the_lst_and_pack_finds_them(faces, tmp_path, monkeypatch):
    lst = faces / "rel.lst"
    assert run(["lst", str(faces / "faces"), "-o", str(lst), "--relative", "-q"]) == 0
    assert lst.read_text().splitlines()[0] == "1\tfaces/id00/000.jpg\t0"
    monkeypatch.chdir(tmp_path)  # pack resolves them against the .lst's folder, not the working directory
    assert run(["pack", str(lst), "--out", "out", "-q"]) == 0
    recs = records(tmp_path / "out")
    assert len(recs) == 120 + 1 + 24 and recs[1][1] == (faces / "faces/id00/000.jpg").read_bytes()
    assert (tmp_path / "out/train.lst").read_text().splitlines()[0] == f"1\t{faces}/faces/id00/000.jpg\t0"


def test_lst_to_stdout_and_empty_folder_error(faces, tmp_path, capsys):
    assert run(["lst", str(faces / "faces"), "-o", "-", "--aligned", "0", "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[5] == f"0\t{faces}/faces/id01/000.jpg\t1" and "24 identities" in cap.err
    (tmp_path / "flat.jpg").write_bytes(b"x")
    assert run(["lst", str(tmp_path), "-o", str(tmp_path / "x.lst")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no images found under" in err and "1 not inside an identity folder" in err
    assert not (tmp_path / "x.lst").exists()


@pytest.mark.parametrize("cmd", ["lst", "pack"])
def test_help_teaches_with_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        run([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"gpu-align {cmd} " in out
    if cmd == "pack":
        opts = ("--layout", "--label-style", "--image-size", "--min-images", "--shuffle", "--resume", "--overwrite")
        assert all(opt in out for opt in opts)
        assert "scalar (default)" in out


# ------------------------------------------------------------------------------------------------ pack


def test_pack_default_insightface_scalar(faces, tmp_path, capsys):
    out = tmp_path / "rec"
    assert run(["pack", str(faces / "faces.lst"), "--out", str(out), "-q"]) == 0
    assert f"{out}: 120 images, 24 identities (insightface layout, scalar labels)" in capsys.readouterr().out
    recs = records(out)
    assert list(recs) == [*range(1, 121), 0, *range(121, 145)]
    assert all(recs[k][0].flag == 0 and recs[k][0].label == (k - 1) // 5 for k in range(1, 121))
    assert list(recs[0][0].label) == [121, 145]
    assert [list(recs[k][0].label) for k in (121, 144)] == [[1, 6], [116, 121]]
    assert recs[7][1] == (faces / "faces/id01/001.jpg").read_bytes()  # bytes stored as-is
    assert (out / "property").read_text() == "24,112,112\n"
    assert (out / "train.lst").read_text() == (faces / "faces.lst").read_text()
    names = ["property", "report.html", "report.json", "train.idx", "train.lst", "train.rec", "train.rec.crc"]
    assert sorted(p.name for p in out.iterdir()) == names


def _bad_lst(faces: Path, tmp_path: Path) -> Path:
    """A .lst with a missing file, a folder, a non-image, a wrong-size image, an aligned=0 photo, a lone image."""
    root = faces / "faces"
    (tmp_path / "notjpeg.jpg").write_text("hello")
    big = cv2.imencode(".jpg", cv2.imread(str(root / "id00/000.jpg")).repeat(2, 0).repeat(2, 1))[1]
    (tmp_path / "big.jpg").write_bytes(big.tobytes())
    lines = [
        f"1\t{root}/id00/000.jpg\t10",
        f"1\t{tmp_path}/gone.jpg\t10",
        f"1\t{tmp_path}\t10",
        f"1\t{root}/id00/001.jpg\t10",
        f"1\t{tmp_path}/notjpeg.jpg\t11",
        f"1\t{tmp_path}/big.jpg\t11",
        f"0\t{tmp_path}/photo.jpg\t11\t10\t10\t90\t90",
        f"1\t{root}/id02/000.jpg\t12",
        f"1\t{root}/id03/000.jpg\t13",
        f"1\t{root}/id03/001.jpg\t13",
    ]
    lst = tmp_path / "bad.lst"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_pack_skips_bad_files_and_reports_them(faces, tmp_path, capsys):
    lst = _bad_lst(faces, tmp_path)
    out = tmp_path / "rec"
    assert run(["pack", str(lst), "--out", str(out), "--label-style", "pair", "--min-images", "2", "-q"]) == 0
    cap = capsys.readouterr()
    assert "1 lines have aligned=0" in cap.err and f"{tmp_path}/photo.jpg" in cap.err and "gpu-align run" in cap.err
    recs = records(out)
    # label 10 -> class 0 (2 images); 11 -> nothing; 12 -> 1 image < min 2, dropped; 13 -> class 1
    assert list(recs) == [1, 2, 3, 4, 0, 5, 6]
    assert [list(recs[k][0].label) for k in (1, 2, 3, 4)] == [[0, 1], [0, 1], [1, 1], [1, 1]]
    assert all(h.flag == 2 for h, _ in recs.values())
    report = json.loads((out / "report.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["gone.jpg"] == "missing file"
    assert reasons[tmp_path.name] == "unreadable: not a regular file"
    assert reasons["notjpeg.jpg"].startswith("not an image: no JPEG or PNG header (starts with 68 65 6c 6c 6f)")
    assert reasons["big.jpg"].startswith("wrong size: 224x224, expected 112x112 (--image-size)")
    assert reasons["photo.jpg"].startswith("needs alignment: aligned=0 line")
    assert reasons["000.jpg"].startswith("too few images")
    assert report["counts"] == {"inputs": 10, "images": 4, "classes": 2, "skipped": 6, "dropped_identities": 1}
    assert "skipped 6 inputs" in cap.out and str(out / "report.json") in cap.out
    assert (out / "property").read_text() == "2,112,112\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("1\t/a.jpg\t0\n1\t/b.jpg\n", r"bad\.lst:2: expected 3, 7 or 17 tab-separated fields"),
        ("0\t0.000000\tid00/000.jpg\n", r"bad\.lst:1: this is an mxnet im2rec \.lst line"),
        (
            "1\t/a.jpg\t0\n1\t/b.jpg\t1\n1\t/c.jpg\t0\n",
            r"bad\.lst:3: label 0 appears again; its images were on lines 1-1 ",
        ),
    ],
)
def test_malformed_lst_is_fatal_before_writing(tmp_path, capsys, text, match):
    lst = tmp_path / "bad.lst"
    lst.write_text(text)
    assert run(["pack", str(lst), "--out", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu-align: error: ")
    assert re.search(match, err)
    assert not (tmp_path / "rec").exists()


def test_pack_refuses_aligned_crops_named_in_an_archive_before_writing(faces, tmp_path, capsys):
    """``gpu-align lst crops.tar`` (aligned=1 by default) then ``pack``: pack reads crops from files only, and used to
    write an empty dataset with every line skipped as a "missing file". Now it says so before writing anything."""
    archive = tmp_path / "crops.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(faces / "faces" / "id00", arcname="id00")
        tf.add(faces / "faces" / "id01", arcname="id01")
    assert run(["lst", str(archive), "-o", str(tmp_path / "crops.lst"), "-q"]) == 0
    capsys.readouterr()
    assert run(["pack", str(tmp_path / "crops.lst"), "--out", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names an archive member as an aligned crop (aligned=1: " in err
    assert not (tmp_path / "rec").exists()


def test_pack_of_a_non_utf8_file_name_writes_report_html(faces, tmp_path, capsys):
    """A folder name that is not UTF-8 (``caf\\xe9``, surrogate-escaped in Python) reaches report.html: the page
    was not written ("surrogates not allowed"); names are escaped in it now, as in report.json."""
    root = tmp_path / "faces"
    ident = root / os.fsdecode(b"caf\xe9")
    ident.mkdir(parents=True)
    for name in ("000.jpg", "001.jpg"):
        (ident / name).write_bytes((faces / "faces" / "id00" / name).read_bytes())
    (ident / "002.jpg").write_bytes(b"not a JPEG")  # skipped: the page lists its path
    assert run(["lst", str(root), "-o", str(tmp_path / "x.lst"), "-q"]) == 0
    assert run(["pack", str(tmp_path / "x.lst"), "--out", str(tmp_path / "rec"), "-q"]) == 0
    assert "not written" not in capsys.readouterr().err
    assert (tmp_path / "rec" / "report.html").is_file()


def test_pack_refuses_non_empty_dir(faces, tmp_path, capsys):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "x").write_text("x")
    assert run(["pack", str(faces / "faces.lst"), "--out", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert "rec is not empty and holds no pack to resume (x); choose another folder, or use --overwrite" in err
    assert "--resume" not in err
    assert os.listdir(tmp_path / "rec") == ["x"]


def test_flat_shuffle_cli_is_deterministic(faces, tmp_path):
    lst = str(faces / "faces.lst")
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert run(["pack", lst, "--out", str(tmp_path / name), "--layout", "flat", "--shuffle", seed, "-q"]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    ra, rc = records(tmp_path / "a"), records(tmp_path / "c")
    ka, kc = list(ra), list(rc)
    assert ka == kc == list(range(120))
    assert [ra[k][1] for k in ka] != [rc[k][1] for k in kc]
    assert sorted((ra[k][1], ra[k][0].label) for k in ka) == sorted((rc[k][1], rc[k][0].label) for k in kc)
    assert all(ra[k][0].flag == 0 for k in ka)


def test_packer_imports_and_runs_without_torch(faces, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from packer.cli import run\n"
        f"sys.exit(run(['pack', {str(faces / 'faces.lst')!r}, '--out', {str(tmp_path / 'o')!r}, '-q']))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "torch" not in res.stderr and (tmp_path / "o" / "train.rec").is_file()


# ------------------------------------------------------------------------------------------------ crash safety


def _state(out: Path) -> dict | None:
    try:
        return json.loads((out / STATE_NAME).read_bytes())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def packed(faces, tmp_path_factory) -> Path:
    """faces.lst packed once with the default options, never interrupted: what an interrupted pack must resume to."""
    ref = tmp_path_factory.mktemp("packed") / "ref"
    assert run(["pack", str(faces / "faces.lst"), "--out", str(ref), "-q"]) == 0
    return ref


def _kill_at(args, gate: Gate) -> tuple[dict, subprocess.Popen]:
    """Start ``python -m packer ARGS``, SIGKILL it once it is held at ``gate``. Returns (its committed state there,
    the process)."""
    proc = start("packer", *args, env=gate.env())
    held = gate.wait(proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return held, proc


@pytest.mark.slow
@pytest.mark.parametrize("opts", [["--label-style", "pair"], ["--layout", "flat", "--shuffle", "3"]])
def test_sigkill_at_any_phase_then_resume_is_byte_identical(faces, tmp_path, opts):
    lst = faces / "faces.lst"
    ref = tmp_path / "ref"
    assert run(["pack", str(lst), "--out", str(ref), "-q", *opts]) == 0
    out = tmp_path / "out"
    kills = [
        {"at": "commit", "done": 30},  # mid-stream
        {"at": "commit", "done": 85},  # mid-stream again, after a resume
        {"at": "finalize-records"},  # meta records / shuffled copy written, property and report not yet
        {"at": "commit", "phase": "rename"},  # finalized, nothing renamed yet
        {"at": "replace", "name": "train.rec"},  # the rename phase part-way: train.rec in place, the rest not
    ]
    held = []
    pack = ["pack", lst, "--out", out, "-q", *opts]
    for i, spec in enumerate(kills):
        state, _ = _kill_at([*pack, *(["--resume"] if i else [])], Gate.at(tmp_path, **spec))
        assert _state(out) == state  # killed where it was held: nothing was committed after
        held.append(state)
    assert [s["phase"] for s in held] == ["stream", "stream", "finalize", "rename", "rename"]
    assert 30 <= held[0]["done"] < 85 <= held[1]["done"] < 120 == held[2]["done"]
    assert (out / "train.rec").is_file() and not (out / "report.json").exists()  # the last kill: renamed part-way
    # without --resume the unfinished pack is protected
    res = _pack(lst, out, *opts)
    assert res.returncode == 2 and "holds an unfinished pack" in one_error_line(res.stderr)
    res = _pack(lst, out, *opts, "--resume")
    assert res.returncode == 0, res.stderr
    assert _files(out) == _files(ref)


@pytest.mark.slow
def test_ctrl_c_keeps_the_partial_pack_and_says_how_to_resume(faces, packed, tmp_path):
    lst, out = faces / "faces.lst", tmp_path / "out"
    gate = Gate.at(tmp_path, "commit", done=20)
    proc = start("packer", "pack", lst, "--out", out, "-q", env=gate.env(), text=True)
    held = gate.wait(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "rerun the same command with --resume" in err
    assert 20 <= held["done"] == _state(out)["done"] < 120  # finished identities were committed on the way out
    assert run(["pack", str(lst), "--out", str(out), "--resume", "-q"]) == 0
    assert _files(out) == _files(packed)


@pytest.mark.slow
def test_file_size_limit_error_is_one_line_and_resumable(faces, packed, tmp_path):
    """A write error mid-pack (EFBIG from RLIMIT_FSIZE, the same path as ENOSPC): one line, then --resume."""
    lst, out = faces / "faces.lst", tmp_path / "out"
    rec_size = (packed / "train.rec").stat().st_size

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (rec_size // 2, rec_size // 2))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    res = _pack(lst, out, preexec_fn=limit)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "File too large" in line and "rerun the same command with --resume" in line
    assert _state(out)["phase"] == "stream"  # the partial pack is kept (what was committed, if anything)
    assert run(["pack", str(lst), "--out", str(out), "--resume", "-q"]) == 0
    assert _files(out) == _files(packed)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, ro: bool = False):
    path.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]).returncode:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_disk_full_is_one_line_and_resumable(faces, packed, tmp_path):
    lst = faces / "faces.lst"
    with _tmpfs(tmp_path / "small", "256k") as out:
        res = _pack(lst, out)
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert "No space left on device" in line and "--resume" in line
        assert _state(out) is not None
        subprocess.run(["mount", "-o", "remount,size=8m", str(out)], check=True)
        res = _pack(lst, out, "--resume")
        assert res.returncode == 0, res.stderr
        assert _files(out) == _files(packed)


@pytest.mark.slow
def test_failed_start_leaves_nothing_behind(faces, tmp_path):
    """Out of inodes before the first commit: one line, no stray files, and the same command then just works."""
    lst = faces / "faces.lst"
    with _tmpfs(tmp_path / "few", "1m,nr_inodes=6") as out:  # the folder + 5 partials; the state file fails
        res = _pack(lst, out)
        assert res.returncode == 2 and "No space left on device" in one_error_line(res.stderr)
        assert os.listdir(out) == []
        subprocess.run(["mount", "-o", "remount,nr_inodes=100", str(out)], check=True)
        res = _pack(lst, out)
        assert res.returncode == 0, res.stderr


def test_unwritable_output_is_one_line(faces, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(["pack", str(faces / "faces.lst"), "--out", str(tmp_path / "file" / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to" in err and "Not a directory" in err


@pytest.mark.slow
def test_read_only_output_is_one_line(faces, tmp_path):
    if os.geteuid() == 0:
        ctx = _tmpfs(tmp_path / "ro", "1m", ro=True)
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
    with ctx as out:
        res = _pack(faces / "faces.lst", out)
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert "cannot write to" in line and ("Read-only file system" in line or "Permission denied" in line)
