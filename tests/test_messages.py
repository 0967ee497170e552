"""What the commands say: headers, notes, errors in the CLI's own words, progress after a resume."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gpu_align.cli import run as gpu_align
from gpu_align.demo.data import build_demo_dataset
from gpu_align.pipeline import RunOptions
from gpu_align.pipeline.stages import _progress
from tests.cli_helpers import one_error_line, run_module
from tests.tools_fixtures import identities


def _crops_lst(tmp: Path, labels: tuple[int, ...]) -> Path:
    """Aligned 112×112 crops on disk and an aligned=1 .lst giving them ``labels`` (one identity per label)."""
    lines = []
    for label, (name, bodies) in zip(labels, identities((2, 2, 2)), strict=True):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for j, body in enumerate(bodies):
            (tmp / name / f"{j}.jpg").write_bytes(body)
            lines.append(f"1\t{tmp / name / f'{j}.jpg'}\t{label}")
    lst = tmp / "crops.lst"
    lst.write_text("\n".join(lines) + "\n")
    return lst


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory) -> tuple[Path, str]:
    """``gpu-align run`` of 2 identities (~4 photos): (its DIR, its stdout)."""
    d = tmp_path_factory.mktemp("msg")
    build_demo_dataset(d / "photos", identities=2, images_per_identity=2)
    res = run_module("gpu_align", "run", d / "photos", "--out", d / "ds", "--device", "cpu", "-q", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return d / "ds", res.stdout


def test_run_summary_time_is_the_reported_time(photo_run):
    out, stdout = photo_run
    assert stdout.startswith("gpu-align run: done\n")
    m = re.search(r"this run +(\d+) photos in ([\d.]+) s, ([\d.,]+) img/s", stdout)
    assert m, stdout
    inv = json.loads((out / "report.json").read_text())["extra"]["run"]["this_invocation"]
    assert int(m.group(1)) == inv["processed"]
    assert m.group(2) == f"{inv['seconds']:.1f}"
    assert float(m.group(3).replace(",", "")) == pytest.approx(inv["images_per_second"], abs=0.06)


def test_gpu_align_pack_of_photos_says_pack(photo_run, tmp_path, capsys):
    """`gpu-align pack train.lst` of photo lines (with landmarks: no detection) aligns them and says 'pack: done'."""
    out, _ = photo_run
    assert gpu_align(["pack", str(out / "train.lst"), "--out", str(tmp_path / "again"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-align pack: done\n") and "gpu-align run: done" not in printed
    assert (tmp_path / "again" / "train.rec").read_bytes() == (out / "train.rec").read_bytes()


def test_packer_pack_refuses_a_photo_lst(photo_run, tmp_path):
    out, _ = photo_run
    res = run_module("packer", "pack", out / "train.lst", "--out", tmp_path / "o", "-q")
    assert res.returncode == 2
    line = one_error_line(res.stderr)  # python -m packer's own one line, no traceback
    assert "aligned=0" in line and "`gpu-align pack " in line and "gpu-align run" in line
    assert not (tmp_path / "o").exists()


def test_aligned_pack_says_done(tmp_path, capsys):
    lst = _crops_lst(tmp_path / "c", (0, 1, 2))
    assert gpu_align(["pack", str(lst), "--out", str(tmp_path / "rec"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-align pack: done\n")
    assert "note:" not in printed  # labels 0, 1, 2 are kept as they are
    assert "label_renumbering" not in json.loads((tmp_path / "rec" / "report.json").read_text())


def test_pack_notes_renumbered_labels(tmp_path, capsys):
    lst = _crops_lst(tmp_path / "c", (3, 7, 9))
    assert gpu_align(["pack", str(lst), "--out", str(tmp_path / "rec"), "-q"]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "note:" in line]
    assert len(notes) == 1 and "3 → 0, 7 → 1, 9 → 2" in notes[0] and "face2rec2 keeps" in notes[0], printed
    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    assert report["label_renumbering"]["lst_to_stored"] == {"3": 0, "7": 1, "9": 2}
    assert report["counts"]["classes"] == 3


@pytest.mark.parametrize(
    "args, flag, keyword",
    [
        (["--min-face-rel", "1.5"], "--min-face-rel", "min_face_rel"),
        (["--batch-size", "0"], "--batch-size", "batch_size"),
        (["--quality", "101"], "--quality", "quality"),
    ],
)
def test_cli_errors_name_flags_not_keywords(photo_run, tmp_path, capsys, args, flag, keyword):
    photos = photo_run[0].parent / "photos"
    assert gpu_align(["run", str(photos), "--out", str(tmp_path / "o"), "--device", "cpu", "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gpu-align: error: {flag} "), err
    assert not re.search(rf"(?<![\w-]){keyword}", err), err  # the keyword itself, not inside the flag


def test_api_errors_name_keywords(photo_run, tmp_path):
    from gpu_align.pipeline import run
    from packer.errors import UserError

    with pytest.raises(UserError, match=r"^min_face_rel must be in \[0, 1\)"):
        run(RunOptions(src=str(photo_run[0].parent / "photos"), out=str(tmp_path / "o"), device="cpu",
                       min_face_rel=1.5, quiet=True))


def test_progress_after_a_resume_counts_this_run_only():
    bar = _progress(RunOptions(src="", out=""), total=1000, initial=900)
    try:
        bar.update(32)
        d = bar.format_dict
        assert (d["n"], d["total"], d["initial"]) == (32, 100, 0)
        assert "resumed at 900 of 1,000" in d["prefix"]
    finally:
        bar.close()


def test_cpu_defaults_keep_a_users_values():
    from gpu_align.cli import cpu_defaults

    env: dict[str, str] = {}
    cpu_defaults(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert int(env["OMP_NUM_THREADS"]) == len(os.sched_getaffinity(0))
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    cpu_defaults(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
