"""`gpu-align unpack`, `inspect`, `bin`, and the one-line errors of the dataset tools on bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tools_fixtures as tf

from packer.binfile import read_bin
from packer.cli import run
from packer.recordio import IRHeader

N, K = tf.N, tf.K


def _write(kind, out, ids):
    return tf.write_kind(kind, out, ids, shuffle_seed=3)


# ------------------------------------------------------------------------------------------------------ unpack


@pytest.mark.parametrize("kind", tf.KINDS)
def test_unpack_writes_stored_bytes(tmp_path, ids, kind, capsys):
    images = _write(kind, tmp_path / "ds", ids)
    out = tmp_path / "imgs"
    assert run(["unpack", str(tmp_path / "ds"), "--out", str(out), "-q"]) == 0
    assert f"unpacked {N} images of {K} labels" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    width = len(str(max(images)))  # keys zero-padded to the widest key (labels here are one digit)
    assert files == sorted(f"{label}/{key:0{width}d}.jpg" for key, (label, _) in images.items())
    for key, (label, body) in images.items():
        assert (out / str(label) / f"{key:0{width}d}.jpg").read_bytes() == body


def test_unpack_png_extension_and_overwrite(tmp_path, ids, capsys):
    png = tf.png(tf.decode_rgb(ids[0][1][0]))
    recs = [(0, IRHeader(0, 0.0, 0, 0), ids[0][1][0]), (1, IRHeader(0, 1.0, 1, 0), png)]
    tf.write_records(tmp_path / "ds", recs, 2)
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run(["unpack", str(tmp_path / "ds"), "--out", str(out)]) == 2
    assert "is not empty; choose an empty folder or pass --overwrite" in capsys.readouterr().err
    assert run(["unpack", str(tmp_path / "ds"), "--out", str(out), "--overwrite", "-q"]) == 0
    assert (out / "1" / "1.png").read_bytes() == png
    assert (out / "0" / "0.jpg").read_bytes() == ids[0][1][0]
    assert (out / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize(
    ("kind", "layout", "style", "first"),
    [
        ("pair", "insightface", "pair", "1    2  [0, 1]"),
        ("scalar", "insightface", "scalar", "1    0  0 "),
        ("released", "insightface", "scalar", "0    2  [15, 19]"),
        ("flat", "flat", "scalar", "0    0  "),
    ],
)
def test_inspect_text(tmp_path, ids, kind, layout, style, first, capsys):
    _write(kind, tmp_path, ids)
    assert run(["inspect", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"layout       {layout}" in out
    assert f"label style  {style}" in out
    assert f"images       {N}\n" in out
    assert f"identities   {K}  (images per identity: min 2, median 3.5, max 5)" in out
    if layout == "insightface":
        assert "header       key 0: flag 2, label [15, 19], id 0, id2 0" in out
        assert f"identity records {N + 1}..{N + K}" in out
    else:
        assert "header       none" in out
    rows = out.split("first records (file order):\n")[1].splitlines()[1:]
    assert len(rows) == 5 and rows[0].strip().startswith(first.strip())
    assert "B  jpeg 112x112" in "\n".join(rows)


def test_inspect_json_and_montage(tmp_path, ids, capsys):
    tf.write_released(tmp_path / "ds", ids)
    png = tmp_path / "m.png"
    args = ["inspect", str(tmp_path / "ds"), "--json", "--records", "3", "--montage", str(png), "--montage-cols", "4"]
    assert run(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "insightface" and info["label_style"] == "scalar"
    assert (info["num_images"], info["num_identities"]) == (N, K)
    assert info["images_per_identity"] == {"min": 2, "median": 3.5, "max": 5}
    assert info["header"] == {"key": 0, "flag": 2, "label": [15.0, 19.0], "id": 0, "id2": 0}
    assert [r["key"] for r in info["first_records"]] == [0, N + 1, 1]  # file order of the released layout
    assert info["first_records"][2]["image_size"] == [112, 112]
    sheet = cv2.imread(str(png))
    # 4 identities (rows) x 4 images (cols) of 112 px + 18 px caption, 4 px gaps
    assert sheet.shape == (4 * (112 + 18 + 4) + 4, 4 * (112 + 4) + 4, 3)
    # the first cell is the first image of class 0 (BGR file, RGB data): compare to the stored JPEG
    first = tf.decode_rgb(ids[0][1][0])
    cell = sheet[4 : 4 + 112, 4 : 4 + 112, ::-1].astype(int)
    assert np.abs(cell - first).mean() < 2


def _pairs_dir(tmp_path, ids):
    root = tmp_path / "aligned"
    paths = []
    for name, bodies in ids[:3]:
        (root / name).mkdir(parents=True)
        for j, body in enumerate(bodies[:2]):
            (root / name / f"{j}.jpg").write_bytes(body)
            paths.append(f"aligned/{name}/{j}.jpg")
    lines = [
        f"{paths[0]} {paths[1]} 1",
        f"{paths[0]}\t{paths[2]}\t0",
        "# comment",
        "",
        f"{paths[2]}  {paths[3]}  1",
        f"{paths[4]} {paths[1]} 0",
    ]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    flat = [p for line in lines if line and not line.startswith("#") for p in line.split()[:2]]
    return [(tmp_path / p).read_bytes() for p in flat]


def test_bin_round_trip_and_inspect(tmp_path, ids, capsys):
    expected = _pairs_dir(tmp_path, ids)
    out = tmp_path / "mine.bin"
    assert run(["bin", str(tmp_path / "pairs.txt"), "--out", str(out), "-q"]) == 0
    assert "4 pairs (2 same, 2 different), 112x112 images" in capsys.readouterr().out
    with open(out, "rb") as f:  # exactly how InsightFace loads it
        bins, issame = pickle.load(f, encoding="bytes")
    assert bins == expected and issame == [True, False, True, False]
    assert all(type(b) is bytes for b in bins) and all(type(x) is bool for x in issame)
    assert read_bin(out) == (expected, [True, False, True, False])

    png = tmp_path / "pairs.png"
    assert run(["inspect", str(out), "--montage", str(png), "--montage-cols", "4"]) == 0
    text = capsys.readouterr().out
    assert "pairs             4 (2 same, 2 different)" in text and "image sizes 112x112 (8)" in text
    assert cv2.imread(str(png)).shape == (2 * (112 + 18 + 4) + 4, 2 * (2 * 112 + 2 + 4) + 4, 3)
    assert run(["bin", str(tmp_path / "pairs.txt"), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_bin_rejects_bad_pairs(tmp_path, ids, capsys):
    _pairs_dir(tmp_path, ids)
    pairs = tmp_path / "pairs.txt"
    out = str(tmp_path / "x.bin")
    pairs.write_text("Abel_Pacheco\t1\t4\n")
    assert run(["bin", str(pairs), "--out", out]) == 2
    assert "pairs.txt:1: expected 'pathA pathB 0|1'" in capsys.readouterr().err
    pairs.write_text("aligned/a.jpg aligned/b.jpg 1\n")
    assert run(["bin", str(pairs), "--out", out]) == 2
    assert "pairs.txt:1: image" in capsys.readouterr().err
    big = tmp_path / "big.jpg"
    big.write_bytes(tf.jpeg(np.zeros((120, 120, 3), np.uint8)))
    pairs.write_text(f"aligned/{ids[0][0]}/0.jpg big.jpg 0\n")
    assert run(["bin", str(pairs), "--out", out]) == 2
    assert "is 120x120 but" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


def test_inspect_refuses_pickles_with_code(tmp_path, capsys):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps((subprocess.Popen, ["true"])))
    assert run(["inspect", str(evil)]) == 2
    assert "not an InsightFace verification .bin" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ errors


def _damaged(tmp_path, ids, what):
    ds = tmp_path / "ds"
    tf.write_flat(ds, ids)
    if what == "missing-dir":
        return tmp_path / "nope", "no such file or directory"
    if what == "missing-idx":
        (ds / "train.idx").unlink()
        return ds, "index file missing; rebuild it with: gpu-align reindex"
    if what == "not-recordio":
        (ds / "train.rec").write_bytes(b"hello, this is text\n" * 20)
        return ds, "is not a RecordIO file"
    size = (ds / "train.rec").stat().st_size
    with open(ds / "train.idx", "a") as f:
        f.write(f"{N}\t{size + 12}\n")
    return ds, f"key {N} points at byte {size + 12}, past the end"


@pytest.mark.parametrize("what", ["missing-dir", "missing-idx", "not-recordio", "past-end"])
@pytest.mark.parametrize("command", ["unpack", "inspect"])
def test_bad_input_is_one_error_line(tmp_path, ids, capsys, what, command):
    ds, msg = _damaged(tmp_path, ids, what)
    args = [command, str(ds)] + (["--out", str(tmp_path / "o")] if command == "unpack" else [])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-align: error: ") and msg in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["unpack", "inspect", "verify", "reindex", "bin"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        run([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: gpu-align {command}" in out and "examples:" in out and f"gpu-align {command} " in out


def test_packer_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import packer.reader, packer.verify, packer.reindex, packer.binfile, packer.montage\n"
        "import packer.commands.inspect, packer.commands.unpack, packer.commands.bin\n"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
