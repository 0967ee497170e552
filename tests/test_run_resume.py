"""`gpu-align run` interruptions and resumes: SIGTERM, SIGHUP, a killed packer process, changed inputs, a bad --out,
and --save-crops names. Real photos, real subprocesses, real signals; each waits for the packer's committed state
(never a sleep) before it signals.

One reference run (module fixture) detects a small folder; the interrupted runs pack its ``train.lst`` (landmarks
given, no detection: fast), which rebuilds byte-identical files (tests/test_run.py proves that).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import cv2
import pytest

from gpu_align.cli import run as gpu_align_cli
from gpu_align.demo import photos
from gpu_align.pipeline import INPUTS_NAME, RunOptions, run
from gpu_align.pipeline.align_stage import crop_names
from gpu_align.scan import InputItem, scan_source
from tests.cli_helpers import records, same_outputs, start
from tests.pack_gate import Gate
from tests.photo_files import scaled, write_jpeg

EYES_NOSE_MOUTH = (10, 20, 15, 11, 19, 10, 10, 15, 20, 20)  # x1..x5, y1..y5 of a plausible face
FAST = ["--device", "cpu", "--decoder", "cpu", "--batch-size", "4", "-q"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, int]:
    """(photo folder, finished dataset, inputs): 4 identities × 3 face photos, detected once."""
    root = tmp_path_factory.mktemp("photos")
    astro, hanks = photos.load_rgb("astronaut"), photos.load_rgb("tom_hanks")
    faces = {"a": astro, "b": hanks, "c": astro[:, ::-1], "d": hanks[:, ::-1]}
    for name, rgb in faces.items():
        (root / name).mkdir()
        for k, side in enumerate((220, 260, 300)):
            write_jpeg(root / name / f"{k}.jpg", scaled(rgb, side))
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run(RunOptions(src=str(root), out=str(out), device="cpu", decoder="cpu", batch_size=4, quiet=True))
    assert res.found == 12, res  # every photo has its face: a kill can land between any two identities
    return root, out, res.inputs


def _held_run(lst: Path, out: Path, tmp: Path, **until: str) -> tuple[subprocess.Popen, dict]:
    """Start a run of ``lst`` whose packer holds after its first commit until it is stopped (tests/pack_gate.py;
    ``until="killed"``: until it is killed); return once it is held there, with the state it committed."""
    gate = Gate.at(tmp, "commit", done=1, phase="stream", **until)
    proc = start("gpu_align", "run", str(lst), "--out", str(out), *FAST, env=gate.env())
    return proc, gate.wait(proc)


def _interrupted(lst: Path, out: Path, sig: int, to_group: bool) -> tuple[int, str]:
    """Start a run of ``lst``, signal it while its packer is held after its first commit; (exit code, stderr)."""
    proc, _ = _held_run(lst, out, out.parent)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def _resume(lst: Path, out: Path) -> tuple[int, str]:
    proc = start("gpu_align", "run", str(lst), "--out", str(out), *FAST, "--resume")
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _done(out: Path) -> int:
    return json.loads((out / "pack.state.json").read_text())["done"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_a_changed_photo_is_named(reference, tmp_path, capsys):
    """SIGTERM to the main process only: it stops like Ctrl-C (exit 143, the command to continue). A photo
    changed since is named on --resume, before any model loads; restored (bytes and mtime), the resume finishes
    byte-identical to the uninterrupted run."""
    root, ref_out, n = reference
    out = tmp_path / "out"
    code, err = _interrupted(ref_out / "train.lst", out, signal.SIGTERM, to_group=False)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped; everything aligned so far is kept. To continue, run:" in err
    assert err.strip().splitlines()[-1].endswith("--resume"), err
    done = _done(out)
    assert 0 < done < n
    assert (out / INPUTS_NAME).is_file()
    photo = root / "b" / "1.jpg"
    before, st = photo.read_bytes(), photo.stat()
    photo.write_bytes(before + b"\0" * 6)  # trailing bytes: same picture, other size
    # --fp16 on a CPU fails when the models load: the inputs are refused before that
    assert gpu_align_cli(["run", str(ref_out / "train.lst"), "--out", str(out), *FAST, "--fp16", "--resume"]) == 2
    msg = capsys.readouterr().err
    assert f"{photo} changed since the interrupted run (size {st.st_size} → {st.st_size + 6})" in msg, msg
    assert "fp16" not in msg
    photo.write_bytes(before)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same bytes, touched: refused too (no content hash)
    assert gpu_align_cli(["run", str(ref_out / "train.lst"), "--out", str(out), *FAST, "--resume"]) == 2
    assert "b/1.jpg changed since the interrupted run (modified " in capsys.readouterr().err
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _done(out) == done  # the refusals touched nothing
    code, err = _resume(ref_out / "train.lst", out)
    assert code == 0, err
    same_outputs(ref_out, out)
    assert not (out / INPUTS_NAME).exists() and not (out / "pack.state.json").exists()


@pytest.mark.slow
def test_sighup_to_the_group_stops_cleanly_and_changed_landmarks_are_named(reference, tmp_path, capsys):
    """SIGHUP to the whole process group (a closed terminal): the packer child ignores it, the main process stops
    it cleanly (exit 129). A .lst line whose landmarks changed since is named; restored, --resume is identical."""
    _, ref_out, n = reference
    lst = tmp_path / "train.lst"
    lst.write_bytes((ref_out / "train.lst").read_bytes())
    out = tmp_path / "out"
    code, err = _interrupted(lst, out, signal.SIGHUP, to_group=True)
    assert code == 128 + signal.SIGHUP, err
    assert "To continue, run:" in err and "--resume" in err
    assert 0 < _done(out) < n
    original = lst.read_text(encoding="utf-8")
    lines = original.splitlines()
    f = lines[5].split("\t")
    f[7] = f"{float(f[7]) + 0.5:.2f}"  # x of the left eye
    lst.write_text("\n".join([*lines[:5], "\t".join(f), *lines[6:]]) + "\n", encoding="utf-8")
    assert gpu_align_cli(["run", str(lst), "--out", str(out), *FAST, "--resume"]) == 2
    msg = capsys.readouterr().err
    assert f"{f[1]} changed since the interrupted run (box and landmarks in the .lst:" in msg, msg
    lst.write_text(original, encoding="utf-8")
    code, err = _resume(lst, out)
    assert code == 0, err
    same_outputs(ref_out, out)


def _packer_pid(main_pid: int) -> int:
    """The spawned packer among the main process's children (the other one is multiprocessing's resource tracker)."""
    for task in Path(f"/proc/{main_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing.spawn" in cmdline:
                return int(child)
    raise AssertionError("no packer process")


@pytest.mark.slow
def test_killed_packer_is_reported_with_how_to_continue(reference, tmp_path):
    """kill -9 of the packer process: the main process names it, says how to continue; --resume is identical."""
    _, ref_out, n = reference
    out = tmp_path / "out"
    lst = ref_out / "train.lst"
    proc, _ = _held_run(lst, out, tmp_path, until="killed")
    os.kill(_packer_pid(proc.pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 2, text
    assert "the packer process died (killed by signal 9); everything it committed is kept" in text, text
    assert text.strip().splitlines()[-1].endswith("--resume"), text
    assert "Traceback" not in text
    assert 0 < _done(out) < n
    code, err2 = _resume(lst, out)
    assert code == 0, err2
    same_outputs(ref_out, out)


def test_unusable_out_is_refused_before_models_load(tmp_path, capsys):
    """An --out that is a file, lies below a file, cannot be created (/proc, even as root) or is a link loop is
    refused with advice that fits, before the models load (--fp16 on a CPU would fail there), never '--resume'."""
    root = tmp_path / "photos" / "a"
    root.mkdir(parents=True)
    write_jpeg(root / "0.jpg", scaled(photos.load_rgb("astronaut"), 200))
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = {
        str(a_file): "is a file, not a folder; choose a new or empty folder",
        str(a_file / "sub" / "deeper"): f"{a_file} is a file, so no folder can be made below it",
        "/proc/gpu-align-test/out": "cannot write in /proc",
        str(loop): "is a link to nothing (or a link loop)",
    }
    for out, expected in cases.items():
        assert gpu_align_cli(["run", str(tmp_path / "photos"), "--out", out, *FAST, "--fp16"]) == 2
        msg = capsys.readouterr().err
        assert expected in msg and "--resume" not in msg and "fp16" not in msg, (out, msg)
    assert a_file.read_text() == "mine"
    args = ["run", str(tmp_path / "photos"), "--out", str(tmp_path / "o"), *FAST, "--fp16", "--save-crops"]
    assert gpu_align_cli([*args, str(a_file)]) == 2
    assert "--save-crops" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fingerprint_covers_sizes_mtimes_and_lst_landmarks(tmp_path):
    photo = tmp_path / "p" / "a" / "0.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"x" * 100)
    lst = tmp_path / "in.lst"

    def line(*numbers: float) -> str:
        return "\t".join(["0", str(photo), "0", *map(str, numbers)]) + "\n"

    lst.write_text(line(0, 0, 30, 30, *EYES_NOSE_MOUTH))
    assert scan_source(lst).items[0].landmarks is not None  # usable landmarks: they are what is compared
    base = {s: scan_source(tmp_path / s).fingerprint() for s in ("p", "in.lst")}
    assert base == {s: scan_source(tmp_path / s).fingerprint() for s in ("p", "in.lst")}  # stable
    st = photo.stat()
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    touched = {s: scan_source(tmp_path / s).fingerprint() for s in ("p", "in.lst")}
    assert all(touched[s] != base[s] for s in base)
    lst.write_text(line(0, 0, 30, 30, *EYES_NOSE_MOUTH[:-1], 20.5))
    assert scan_source(lst).fingerprint() != touched["in.lst"]
    lst.write_text(line(0, 0, 30, 31, *EYES_NOSE_MOUTH))
    assert scan_source(lst).fingerprint() != touched["in.lst"]


def test_save_crop_names_never_collide(tmp_path):
    """a.jpg / a.JPG / a.jpeg of one identity are kept apart (real crops on disk, each the record's bytes);
    other identities and unique names keep the short form."""
    root = tmp_path / "photos"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    astro, hanks = photos.load_rgb("astronaut"), photos.load_rgb("tom_hanks")
    write_jpeg(root / "x" / "a.jpg", scaled(astro, 200))
    write_jpeg(root / "x" / "a.JPG", scaled(hanks, 240))
    write_jpeg(root / "x" / "a.jpeg", scaled(astro[:, ::-1], 220))
    cv2.imwrite(str(root / "x" / "b.png"), scaled(hanks, 200)[..., ::-1])
    write_jpeg(root / "y" / "a.jpg", scaled(hanks[:, ::-1], 220))
    out, crops = tmp_path / "out", tmp_path / "crops"
    assert gpu_align_cli(["run", str(root), "--out", str(out), *FAST, "--save-crops", str(crops)]) == 0
    saved = sorted(str(p.relative_to(crops)) for p in crops.rglob("*") if p.is_file())
    assert saved == ["x/a.JPG.jpg", "x/a.jpeg.jpg", "x/a.jpg.jpg", "x/b.png.jpg", "y/a.jpg"]
    lines = (out / "train.lst").read_text(encoding="utf-8").splitlines()
    recs = records(out)
    for key, line in enumerate(lines, start=1):
        src = Path(line.split("\t")[1])
        name = src.name if src.parent.name == "y" else src.name + ".jpg"
        assert (crops / src.parent.name / name).read_bytes() == recs[key][1], src


def test_crop_names_rule():
    def items(*paths: str, group: str = "0") -> list[InputItem]:
        return [InputItem(k, p, group) for k, p in enumerate(paths)]

    assert crop_names(items("/r/a/1.jpg", "/r/b/1.jpg", "/r/c/2.jpeg", "/r/c/3.png")) == [
        "1.jpg.jpg", "1.jpg_2.jpg", "2.jpg", "3.png.jpg"  # one name from two folders of a .lst: numbered
    ]
    # exact names, like the photos' own; "a.png.jpg" is also b.png-style "a.png"'s name: both keep their extension
    assert crop_names(items("/r/A.jpg", "/r/a.jpg", "/r/a.png", "/r/a.png.jpg", "/r/a.png.jpg.jpg")) == [
        "A.jpg", "a.jpg", "a.png.jpg", "a.png.jpg.jpg", "a.png.jpg_2.jpg"
    ]
    assert crop_names(items("/r/a.jpg", "/r/a.jpg", group="1") + items("/r/a.jpg", group="2")) == [
        "a.jpg.jpg", "a.jpg_2.jpg", "a.jpg"  # per identity folder
    ]


def test_refusals_to_open_out_do_not_suggest_resume(reference, tmp_path, capsys):
    """The writer's refusal of a finished dataset or of a folder of other files keeps its own advice: no
    '--resume' appended (nothing of this run was written)."""
    _, ref_out, _ = reference
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    for out, expected in ((ref_out, "already holds a finished dataset"), (other, "is not empty")):
        assert gpu_align_cli(["run", str(ref_out / "train.lst"), "--out", str(out), *FAST]) == 2
        msg = capsys.readouterr().err
        assert expected in msg and "--resume" not in msg, msg
    assert sorted(os.listdir(other)) == ["mine.txt"]
