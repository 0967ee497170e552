"""VGGFace2's loose_bb / loose_landmark CSVs (issue 12): parsing with ``file:line`` errors, the point-order
check, NAME_ID matching, and ``--landmarks-csv`` runs against the detections the CSVs were written from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_align import cli
from gpu_align.csvmeta import apply_csvs, note_photos_without_row, read_csv, write_vggface2_csvs
from gpu_align.demo.data import build_demo_dataset
from gpu_align.demo.vggface2 import write_vggface2_archive
from gpu_align.pipeline import RunOptions, run
from gpu_align.scan import InputItem
from packer.errors import UserError

LM_HEAD = "NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"
GOOD = "30,40,70,40,50,60,35,80,65,80"  # eyes level, nose below, mouth below the nose


def _write(tmp: Path, text: str, name: str = "lm.csv") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_landmark_rows_and_name_id_forms(tmp_path):
    text = LM_HEAD + f'"n000002/0001_01",{GOOD}\ntrain/n000003/0002_01.jpg,{GOOD}\n0003_01.JPG,{GOOD}\n'
    t = read_csv(_write(tmp_path, text), "landmarks")
    assert sorted(t.rows) == ["0003_01", "n000002/0001_01", "n000003/0002_01"]
    assert t.rows["n000002/0001_01"].tolist() == [[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]
    assert t.lines["n000003/0002_01"] == 3


@pytest.mark.parametrize(
    ("text", "kind", "match"),
    [
        (LM_HEAD + f"a/b,{GOOD}\na/c,1,2,3\n", "landmarks", r"lm\.csv:3: expected 11 fields"),
        (LM_HEAD + f"a/b,{GOOD}\na/c,{GOOD.replace('70', 'x')}\n", "landmarks", r"lm\.csv:3: fields after NAME_ID"),
        (LM_HEAD + f"a/b,{GOOD}\n\na/b.jpg,{GOOD}\n", "landmarks", r"lm\.csv:4: NAME_ID 'a/b.jpg' again"),
        ("NAME_ID,X,Y,W,H\na/b,1,2,3,4\n", "landmarks", r"lm\.csv:1: this is a loose_bb file; pass it with --box"),
        (LM_HEAD + f"a/b,{GOOD}\n", "boxes", r"lm\.csv:1: this is a loose_landmark file; pass it with --landmarks-csv"),
        ("name,x\n", "boxes", r"lm\.csv:1: expected the header NAME_ID,X,Y,W,H"),
        ("NAME_ID,X,Y,W,H\na/b,1,2,0,4\n", "boxes", r"lm\.csv:2: box X,Y,W,H .* W, H > 0"),
        (LM_HEAD, "landmarks", "no rows after the header"),
    ],
)
def test_malformed_files_are_refused_with_file_and_line(tmp_path, text, kind, match):
    with pytest.raises(UserError, match=match):
        read_csv(_write(tmp_path, text), kind)


def test_point_order_is_checked_on_load(tmp_path):
    """Eyes swapped in every row (P1 right of P2): refused naming the rule; a single odd row (a profile) is fine."""
    swapped = "70,40,30,40,50,60,35,80,65,80"
    with pytest.raises(UserError, match=r"P1 \(left eye\) left of P2 \(right eye\) holds in only 0%"):
        read_csv(_write(tmp_path, LM_HEAD + f"a/b,{swapped}\na/c,{swapped}\n"), "landmarks")
    upside = "30,80,70,80,50,60,35,40,65,40"  # mouth above the nose: not this file's order either
    with pytest.raises(UserError, match="P3 \\(nose\\) below the eyes"):
        read_csv(_write(tmp_path, LM_HEAD + f"a/b,{upside}\n"), "landmarks")
    t = read_csv(_write(tmp_path, LM_HEAD + f"a/b,{GOOD}\na/c,{GOOD}\na/d,{swapped}\n"), "landmarks")
    assert len(t.rows) == 3
    t = read_csv(_write(tmp_path, LM_HEAD + f"a/b,{GOOD}\na/c,1,1,1,1,1,1,1,1,1,1\n"), "landmarks")
    assert t.bad["a/c"].startswith("bad landmarks: eyes on one point") and t.bad["a/c"].endswith("lm.csv:3)")


def test_matching_reports_missing_rows_ambiguous_rows_and_photos_without_rows(tmp_path):
    items = [
        InputItem(0, "/d/train/n1/0001_01.jpg", "n1"),
        InputItem(1, "/d/x.tar.gz::train/n1/0002_01.jpg", "n1"),
        InputItem(2, "/d/train/n2/0001_01.jpg", "n2"),
        InputItem(3, "/d/train/n2/0003_01.png", "n2"),
    ]
    lm = _write(tmp_path, LM_HEAD + f"n1/0001_01,{GOOD}\n0002_01,{GOOD}\n0001_01,{GOOD}\nn9/0001_01,{GOOD}\n")
    bb = _write(tmp_path, "NAME_ID,X,Y,W,H\nn2/0003_01.png,10,20,30,40\n", "bb.csv")
    out, (m_lm, m_bb) = apply_csvs(items, landmarks=str(lm), boxes=str(bb))
    note_photos_without_row([m_lm, m_bb], out)
    assert [it.landmarks is not None for it in out] == [True, True, False, False]
    assert out[3].ref_box == (10.0, 20.0, 40.0, 60.0) and out[3].bbox is None
    assert (m_lm.matched, m_lm.rows_without_photo, m_lm.ambiguous_rows) == (2, ["n9/0001_01 (line 5)"],
                                                                          ["0001_01 (line 4: 2 photos)"])
    assert m_lm.photos_without_row == [items[2].path, items[3].path]
    assert m_bb.matched == 1 and len(m_bb.photos_without_row) == 3
    rep = m_lm.report()
    assert (rep["rows"], rep["rows_without_photo"], rep["ambiguous_rows"], rep["photos_without_row"]) == (4, 1, 1, 2)
    assert "2 of 4 rows" in m_lm.summary()


@pytest.fixture(scope="module")
def detected(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(VGGFace2-like tar.gz, its detection run, meta folder with the CSVs written from that run's train.lst)."""
    base = tmp_path_factory.mktemp("csvrun")
    build_demo_dataset(base / "x" / "train", identities=3, images_per_identity=3, seed=8)
    archive = base / "vggface2_train.tar.gz"
    write_vggface2_archive(base / "x" / "train", archive, seed=1)
    out = base / "detected"
    res = run(RunOptions(src=str(archive), out=str(out), device="cpu", decoder="cpu", batch_size=4, quiet=True))
    assert res.found >= 6
    meta = base / "meta"
    rows = write_vggface2_csvs(out / "train.lst", meta / "loose_bb_train.csv", meta / "loose_landmark_train.csv")
    assert rows == res.found
    return archive, out, meta


def test_landmarks_csv_reproduces_the_detections_it_was_written_from(detected, tmp_path, capsys):
    """``--landmarks-csv`` (no MTCNN) on the archive gives the detection run's records byte for byte; with
    ``--boxes-csv`` too, the train.lst boxes are the file's, so train.lst is identical as well."""
    archive, ref_out, meta = detected
    out = tmp_path / "csv"
    args = ["run", str(archive), "--out", str(out), "--device", "cpu", "--decoder", "cpu", "--batch-size", "4"]
    lm = ["--landmarks-csv", str(meta / "loose_landmark_train.csv")]
    assert cli.run([*args, *lm, "--boxes-csv", str(meta / "loose_bb_train.csv")]) == 0
    assert "loose_landmark_train.csv: landmarks (no detection) for" in capsys.readouterr().err
    for name in ("train.rec", "train.idx", "property", "train.lst"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    report = json.loads((out / "report.json").read_text())
    csvs = {c["kind"]: c for c in report["extra"]["run"]["csv"]}
    assert csvs["landmarks"]["matched"] == csvs["landmarks"]["rows"] and csvs["landmarks"]["rows_without_photo"] == 0
    assert report["extra"]["run"]["this_invocation"]["stage_seconds"]["detect"] < 0.5


def test_landmarks_csv_with_a_missing_row_detects_that_photo(detected, tmp_path):
    """A photo whose row is removed is detected instead (same face, same bytes); a row whose photo the archive
    lacks is reported, never an error."""
    archive, ref_out, meta = detected
    lines = (meta / "loose_landmark_train.csv").read_text().splitlines()
    dropped = lines.pop(2)
    lines.append("n999999/0001_01," + dropped.split(",", 1)[1])
    lm = _write(tmp_path, "\n".join(lines) + "\n", "lm.csv")
    out = tmp_path / "out"
    opts = RunOptions(src=str(archive), out=str(out), device="cpu", decoder="cpu", batch_size=4, quiet=True)
    opts.landmarks_csv = str(lm)
    run(opts)
    for name in ("train.rec", "train.idx"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    rep = json.loads((out / "report.json").read_text())["extra"]["run"]["csv"][0]
    assert rep["rows_without_photo_examples"] == [f"n999999/0001_01 (line {len(lines)})"]
    assert rep["photos_without_row"] >= 1


def test_boxes_csv_alone_keeps_the_detections_of_single_face_photos(detected, tmp_path):
    """One face per photo: the box picks the face the policy would pick; the records are the same bytes."""
    archive, ref_out, meta = detected
    out = tmp_path / "out"
    opts = RunOptions(src=str(archive), out=str(out), device="cpu", decoder="cpu", batch_size=4, quiet=True)
    opts.boxes_csv = str(meta / "loose_bb_train.csv")
    run(opts)
    for name in ("train.rec", "train.idx", "train.lst"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_boxes_csv_chooses_among_several_faces_and_reports_no_match(tmp_path):
    """insightface's t1.jpg (six people): the listed box selects that person, not the centre-largest face; a box
    on no face is 'box not matched' (skipped and reported, not a heuristic's pick); photos without a row keep
    the --select policy."""
    from gpu_align.demo.photos import load_rgb
    from tests.photo_files import write_jpeg

    root = tmp_path / "photos" / "n1"
    root.mkdir(parents=True)
    t1 = load_rgb("t1")
    for name in ("a", "b", "c"):
        write_jpeg(root / f"{name}.jpg", t1)
    back_left = (268, 150, 375, 272)  # a face of t1 (gpu_align.demo.data._FACES), not the centre-largest one
    bb = _write(tmp_path, "NAME_ID,X,Y,W,H\n"
                f"n1/a,{back_left[0] - 15},{back_left[1] - 20},{back_left[2] - back_left[0] + 30},"
                f"{back_left[3] - back_left[1] + 30}\nn1/b.jpg,600,20,60,60\n", "bb.csv")
    out = tmp_path / "out"
    opts = RunOptions(src=str(tmp_path / "photos"), out=str(out), device="cpu", decoder="cpu", quiet=True)
    opts.boxes_csv = str(bb)
    res = run(opts)
    rows = {Path(r.split("\t")[1]).name: [int(v) for v in r.split("\t")[3:7]]
            for r in (out / "train.lst").read_text().splitlines()}
    box = rows["a.jpg"]
    assert max(abs(u - v) for u, v in zip(box, back_left, strict=True)) < 25, box
    assert rows["c.jpg"] != box  # no row: the centre-largest face
    skipped = {Path(s["path"]).name: s["reason"] for s in json.loads((out / "report.json").read_text())["skipped"]}
    assert skipped["b.jpg"].startswith("box not matched: "), skipped
    assert (res.found, res.failed) == (2, 1)
