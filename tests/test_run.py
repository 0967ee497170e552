"""End-to-end ``gpu-align run`` on CPU: real photos with bad files mixed in, read back, resumed, re-packed.

One reference run (module fixture) detects and aligns a small VGGFace2-like folder. The other tests rebuild from
its ``train.lst`` (landmarks given, so no detection: fast) or rerun pieces of it, and compare bytes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpu_align.cli import run as gpu_align_cli
from gpu_align.demo import photos
from gpu_align.pipeline import RunOptions, run
from packer.cli import run as cli_run
from tests.badfiles import huge_gradient_jpeg, make_bad_files
from tests.cli_helpers import records, same_outputs, start
from tests.pack_gate import Gate
from tests.photo_files import scaled, write_jpeg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """root/<identity>/<image>: 3 face identities, one of only bad files, one whose photos all miss."""
    root = tmp_path_factory.mktemp("photos")
    astro, hanks = photos.load_rgb("astronaut"), photos.load_rgb("tom_hanks")
    a = root / "alice"
    a.mkdir()
    for k, side in enumerate((200, 320, 480)):
        write_jpeg(a / f"{k}.jpg", scaled(astro, side), quality=70 + 10 * k)
    z = root / "Zoë 日本"  # unicode identity and file names
    z.mkdir()
    write_jpeg(z / "één.jpg", scaled(hanks, 300))
    cv2.imwrite(str(z / "twee.png"), scaled(hanks, 240)[..., ::-1])  # a PNG
    (z / "notes.txt").write_text("not a photo")  # left out by the scan, reported
    g = root / "grey"
    g.mkdir()
    cv2.imwrite(str(g / "camera.jpg"), photos.load_rgb("camera")[..., 0])  # grayscale JPEG
    (g / "huge.jpg").write_bytes(huge_gradient_jpeg(scaled(photos.load_rgb("camera"), 3000)))
    bad = make_bad_files(root / "mixed", huge=False)
    # keep the mixed identity small: the decodable ones are all the same astronaut photo
    for name in ("progressive_jpeg", "trailing_bytes_jpeg", "png"):
        bad[name].path.unlink()
    n = root / "nobody"
    n.mkdir()
    for name in ("coffee", "chelsea"):
        write_jpeg(n / f"{name}.jpg", scaled(photos.load_rgb(name), 300))
    return root


def _opts(src, out, **kw) -> RunOptions:
    kw = {"batch_size": 4, "quiet": True, "device": "cpu", "decoder": "cpu", **kw}
    return RunOptions(src=str(src), out=str(out), **kw)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    result = run(_opts(dataset, out))
    return out, result


@pytest.mark.slow
def test_end_to_end_outputs(reference, dataset):
    out, result = reference
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    recs = records(out)
    header = recs[0][0]
    n_img = int(header.label[0]) - 1
    identities = range(int(header.label[0]), int(header.label[1]))
    assert report["counts"]["images"] == n_img == result.found
    assert (out / "property").read_text().strip() == f"{len(identities)},112,112"
    # sorted identities: Zoë 2, alice 3, grey 2 (grayscale + huge), mixed: the decodable astronaut variants;
    # nobody: no label
    ranges = [tuple(int(x) for x in recs[k][0].label) for k in identities]
    sizes = [e - s for s, e in ranges]
    assert sizes[:3] == [2, 3, 2] and len(sizes) == 4 and sizes[3] >= 5, sizes
    for label, (s, e) in enumerate(ranges):
        for key in range(s, e):
            h, body = recs[key]
            assert h.flag == 0 and h.label == label and h.id == key
            img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (112, 112, 3)
    # every bad file is in the report with its reason; the all-miss identity's photos as "no face"
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["zero_byte.jpg"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("truncated")
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["corrupt.jpg"].startswith("corrupt")
    assert reasons["bomb.jpg"].startswith("too large")
    assert reasons["coffee.jpg"].startswith("no face") and reasons["chelsea.jpg"].startswith("no face")
    scan_skipped = {Path(s["path"]).name for s in report["extra"]["run"]["scan_skipped"]}
    assert {"notes.txt", "animation.gif", "dangling_link.jpg"} <= scan_skipped
    assert report["counts"]["inputs"] == n_img + len(report["skipped"])
    # train.lst: one face2rec2 line per record, source photo, box and 10 landmarks
    lines = (out / "train.lst").read_text(encoding="utf-8").splitlines()
    assert len(lines) == n_img
    f = lines[0].split("\t")
    assert f[0] == "0" and Path(f[1]).is_file() and len(f) == 17
    assert (dataset / "Zoë 日本" / "twee.png").samefile(f[1])  # str order: "twee" < "één"
    assert cli_run(["verify", str(out)]) == 0


@pytest.mark.slow
def test_stored_crop_is_the_aligned_face(reference):
    """Each stored crop is the source photo warped (OpenCV, skimage's similarity: an independent implementation)
    with the landmarks train.lst records, and those landmarks are the face's (MTCNN on the photo, full pyramid)."""
    from skimage.transform import SimilarityTransform

    from gpu_align import FaceAligner
    from gpu_align.align.warp import ARCFACE_112

    out, _ = reference
    recs = records(out)
    lines = (out / "train.lst").read_text(encoding="utf-8").splitlines()
    checked = 0
    for key, line in enumerate(lines, start=1):
        f = line.split("\t")
        if not f[1].endswith(("alice/2.jpg", "twee.png", "één.jpg")):  # frontal faces (camera.png is near-profile)
            continue
        lm = np.array([float(v) for v in f[7:17]]).reshape(2, 5).T  # x1..x5 y1..y5 -> (5, 2)
        photo = cv2.imread(f[1], cv2.IMREAD_COLOR)  # BGR
        M = SimilarityTransform.from_estimate(lm, np.array(ARCFACE_112)).params[:2]
        expected = cv2.warpAffine(photo, M, (112, 112), borderValue=0)
        stored = cv2.imdecode(np.frombuffer(recs[key][1], np.uint8), cv2.IMREAD_COLOR)  # RGB-correct JPEG
        assert np.abs(stored.astype(int) - expected.astype(int)).mean() < 3.0  # JPEG q95 noise only
        raw = FaceAligner(min_face_rel=0.0, refine=False).align([np.ascontiguousarray(photo[..., ::-1])])
        assert bool(raw.found[0])
        iod = np.linalg.norm(lm[1] - lm[0])
        assert np.linalg.norm(raw.landmarks[0].numpy() - lm, axis=1).max() < 0.15 * iod
        checked += 1
    assert checked == 3


def test_refuses_non_empty_out_dir(tmp_path, dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    assert gpu_align_cli(["run", str(dataset), "--out", str(out), "--device", "cpu", "-q"]) == 2
    assert (out / "something.txt").read_text() == "mine"


@pytest.mark.slow
def test_lst_round_trip_rebuilds_identical_dataset(reference, tmp_path):
    """train.lst holds the landmarks: `gpu-align pack train.lst` (no detection) rebuilds byte-identical files."""
    out, _ = reference
    again = tmp_path / "again"
    assert gpu_align_cli(["pack", str(out / "train.lst"), "--out", str(again), "-q"]) == 0
    same_outputs(out, again)  # identical records (JPEG bytes), index, train.lst and property
    report = json.loads((again / "report.json").read_text(encoding="utf-8"))
    assert report["extra"]["run"]["this_invocation"]["found"] == report["counts"]["images"]


@pytest.mark.slow
def test_pack_refuses_a_lst_mixing_crops_and_photos(reference, tmp_path):
    out, _ = reference
    lines = (out / "train.lst").read_text(encoding="utf-8").splitlines()
    mixed = tmp_path / "mixed.lst"
    mixed.write_text("\n".join(["1" + lines[0][1:], *lines[1:]]) + "\n", encoding="utf-8")
    assert gpu_align_cli(["pack", str(mixed), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_resumes_to_identical_output(dataset, reference, tmp_path, sig):
    """kill -9 (the machine dies) or Ctrl-C mid-run, then --resume: the same bytes as an uninterrupted run."""
    ref_out, ref = reference
    out = tmp_path / "out"
    args = ["run", str(dataset), "--out", str(out), "--device", "cpu", "--decoder", "cpu", "--batch-size", "4", "-q"]
    gate = Gate.at(tmp_path, "commit", done=4, phase="stream")  # the packer holds there until it is stopped
    proc = start("gpu_align", *args, env=gate.env())
    held = gate.wait(proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert b"--resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    done = json.loads((out / "pack.state.json").read_text())["done"]
    assert 4 <= done == held["done"] < ref.inputs  # what was committed where the run was stopped
    proc = start("gpu_align", *args, "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    same_outputs(ref_out, out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["extra"]["run"]["this_invocation"]["resumed_at"] == done


@pytest.mark.slow
def test_write_error_is_one_line_and_resumable(reference, tmp_path):
    """A write failure (file size limit standing in for a full disk) stops with one clear line; --resume finishes."""
    ref_out, _ = reference
    src = ref_out / "train.lst"
    out = tmp_path / "out"
    args = ["run", str(src), "--out", str(out), "--device", "cpu", "--decoder", "cpu", "--batch-size", "4", "-q"]

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    proc = start("gpu_align", *args, preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "--resume" in lines[0], lines
    proc = start("gpu_align", *args, "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    same_outputs(ref_out, out)


@pytest.mark.slow
def test_flat_layout_with_dali_decoder_reads_back_in_dali(reference, tmp_path):
    """The DALI decode stage (CPU pipeline here) feeds a flat, shuffled dataset that DALI's mxnet reader reads."""
    dali = pytest.importorskip("nvidia.dali")
    fn = pytest.importorskip("nvidia.dali.fn")
    ref_out, _ = reference
    out = tmp_path / "flat"
    run(_opts(ref_out / "train.lst", out, decoder="dali", layout="flat", shuffle=5))
    ref_label = {}  # source photo -> (label, decoded crop) in the reference dataset
    ref_recs = records(ref_out)
    for key, line in enumerate((ref_out / "train.lst").read_text(encoding="utf-8").splitlines(), start=1):
        h, body = ref_recs[key]
        ref_label[line.split("\t")[1]] = (int(h.label), cv2.imdecode(np.frombuffer(body, np.uint8), 1))
    paths = [line.split("\t")[1] for line in (out / "train.lst").read_text(encoding="utf-8").splitlines()]
    assert sorted(paths) == sorted(ref_label) and paths != list(ref_label)  # the same photos, shuffled

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.mxnet(path=[str(out / "train.rec")], index_path=[str(out / "train.idx")])
        return fn.decoders.image(jpegs, device="cpu", output_type=dali.types.BGR), labels

    p = pipe()
    p.build()
    for path in paths:  # file order = train.lst order
        img, label = (np.asarray(o.at(0)) for o in p.run())
        want_label, want_img = ref_label[path]
        assert label.tolist() == [float(want_label)]
        assert img.shape == (112, 112, 3)
        # same landmarks, decoded by DALI instead of simplejpeg: nearly the same crop
        assert np.abs(img.astype(int) - want_img.astype(int)).mean() < 2.0


@pytest.mark.slow
def test_shards_merge_into_the_unsharded_dataset(reference, tmp_path):
    """--shard i/n splits identities into contiguous blocks; merging the shards in order gives the same dataset."""
    from packer.reader import DatasetReader

    ref_out, _ = reference
    src = ref_out / "train.lst"
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, out in enumerate(shards):
        run(_opts(src, out, shard=(i, 2)))
    sizes = [DatasetReader(out).num_classes for out in shards]
    assert all(sizes) and sum(sizes) == DatasetReader(ref_out).num_classes
    merged = tmp_path / "merged"
    assert cli_run(["merge", *map(str, shards), "--out", str(merged), "-q"]) == 0
    with DatasetReader(ref_out) as a, DatasetReader(merged) as b:
        assert [(r.key, r.label, r.body) for r in a] == [(r.key, r.label, r.body) for r in b]


@pytest.mark.slow
def test_limit_and_save_crops(reference, tmp_path):
    ref_out, _ = reference
    out, crops = tmp_path / "out", tmp_path / "crops"
    res = run(_opts(ref_out / "train.lst", out, limit=5, save_crops=str(crops)))
    assert res.inputs == 5 and res.found == 5
    recs = records(out)
    saved = sorted(crops.rglob("*.jpg"))
    assert len(saved) == 5
    bodies = {recs[k][1] for k in range(1, 6)}
    assert {p.read_bytes() for p in saved} == bodies  # the same JPEG bytes as stored in the .rec


def test_multi_face_photos_are_noted_with_the_runner_up(tmp_path):
    """A group photo is aligned on the policy's face; report.json names it a multi-face photo with the chosen box
    (the one train.lst holds) and the runner-up; a scene whose only detections are below the floor is skipped."""
    root = tmp_path / "photos"
    (root / "group").mkdir(parents=True)
    write_jpeg(root / "group" / "t1.jpg", photos.load_rgb("t1"), quality=95)
    write_jpeg(root / "group" / "astronaut.jpg", photos.load_rgb("astronaut"), quality=95)
    out = tmp_path / "out"
    run(_opts(root, out))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["notes_by_kind"] == {"multi-face": 1} and report["counts"]["images"] == 2
    (note,) = report["notes"]
    assert Path(note["path"]).name == "t1.jpg" and note["identity"] == "group" and note["kind"] == "multi-face"
    assert note["faces"] == 6 and note["select"] == "center-largest"  # six people; the hand and glass are not counted
    assert min(note["chosen"]["score"], note["runner_up"]["score"]) >= 0.9
    line = next(ln for ln in (out / "train.lst").read_text(encoding="utf-8").splitlines() if "t1.jpg" in ln)
    box = [float(v) for v in line.split("\t")[3:7]]  # aligned, path, label, x1, y1, x2, y2, landmarks
    assert np.abs(np.array(box) - note["chosen"]["box"]).max() <= 0.5  # train.lst rounds the box to pixels
    assert np.abs(np.array(note["runner_up"]["box"]) - note["chosen"]["box"]).max() > 20  # another person
    page = (out / "report.html").read_text(encoding="utf-8")  # written beside report.json, self-contained
    assert "t1.jpg" in page and "multi-face" in page.lower() and "http" not in page


def test_cli_face_options_reach_the_run(tmp_path):
    """--detector, --min-score and --landmarks are recorded in report.json; the defaults are mtcnn, the detector's
    floor and raw landmarks."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    write_jpeg(root / "a" / "astronaut.jpg", photos.load_rgb("astronaut"))
    write_jpeg(root / "a" / "coffee.jpg", photos.load_rgb("coffee"))
    base = ["run", str(root), "--device", "cpu", "--decoder", "cpu", "-q"]
    assert gpu_align_cli([*base, "--out", str(tmp_path / "d")]) == 0
    config = json.loads((tmp_path / "d" / "report.json").read_text(encoding="utf-8"))["config"]["input"]
    assert (config["detector"], config["min_score"], config["refine"]) == ("mtcnn", None, False)
    out = tmp_path / "c"
    args = [*base, "--out", str(out), "--detector", "cascade", "--min-score", "0.95", "--landmarks", "refined"]
    assert gpu_align_cli(args) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    config = report["config"]["input"]
    assert (config["detector"], config["min_score"], config["refine"]) == ("cascade", 0.95, True)
    assert report["counts"]["images"] == 1
    (skip,) = report["skipped"]  # coffee.jpg: the detector says why it found nothing
    assert skip["reason"] in ("no face: no cascade box", "no face: cascade box rejected by O-Net"), skip
