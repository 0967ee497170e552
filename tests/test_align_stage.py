"""The run's align stage (gpu_align.pipeline.align_stage.AlignStage) on a real decoded batch of shipped photos.

No packer and no subprocess: the folder is scanned (gpu_align.scan), decoded on the CPU, and handed to the stage
as the run does; its :class:`~packer.process.CropBatch` and counts are checked against what the photos are (three
with a face, one scene without one, one truncated JPEG) and each crop against an independent warp: scikit-image's
Umeyama fit from the ``train.lst`` landmarks the stage wrote to InsightFace's template, then OpenCV's
``warpAffine``. That also shows the ``train.lst`` line reproduces its crop.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from gpu_align.cli import run as gpu_align_cli
from gpu_align.decode import DecodedBatch, make_decoder
from gpu_align.pipeline.align_stage import AlignStage, crop_names
from gpu_align.pipeline.options import RunOptions, StageTimes
from gpu_align.scan import InputItem, scan_source
from packer.lst import format_lst_line
from tests.photo_files import ARCFACE_DST_112

CPU = torch.device("cpu")
# the folder: identity -> shipped photos copied in (file names as shipped)
TREE = {"anna": ("astronaut", "t1"), "ben": ("tom_hanks", "coffee")}
# scan order (sorted names; upper case first): what each input is
ASTRONAUT, T1, TOM, BROKEN, COFFEE = range(5)


def _make_tree(root: Path, photo_path) -> None:
    for folder, names in TREE.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(photo_path(name), root / folder / photo_path(name).name)
    # the group photo cut short: the decoder reports it, the stage passes it on as a failure
    (root / "ben" / "broken.jpg").write_bytes(photo_path("t1").read_bytes()[:3000])


def _decode(items: list[InputItem]) -> DecodedBatch:
    with make_decoder("cpu", device="cpu", threads=1, batch_size=len(items)) as decoder:
        return decoder.decode_paths([it.path for it in items])


def _stage(items: list[InputItem], **options) -> AlignStage:
    return AlignStage(RunOptions(src="unused", out="unused", **options), CPU, items, StageTimes())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photo_path):
    """(items, decoded batch) of the shipped photos in two identity folders."""
    root = tmp_path_factory.mktemp("src")
    _make_tree(root, photo_path)
    items = scan_source(root).items
    assert [Path(it.path).name for it in items] == [
        "astronaut.png",
        "t1.jpg",
        "Tom_Hanks_54745.png",
        "broken.jpg",
        "coffee.png",
    ]
    return items, _decode(items)


@pytest.fixture(scope="module")
def aligned(folder):
    """The stage's output for the whole batch (nothing written before: skip_below 0), with --save-crops names."""
    items, batch = folder
    return _stage(items, save_crops="crops")(batch, 0)


def _points(meta) -> np.ndarray:
    """(5, 2) landmarks of an ItemMeta's train.lst line (x1..x5 y1..y5)."""
    return np.asarray(meta.lst.landmarks, np.float64).reshape(2, 5).T


def _assert_crop_is_the_lst_warp(crop: np.ndarray, image: torch.Tensor, meta) -> None:
    """``crop`` equals the photo warped by the similarity fitted (independently) from the line's landmarks."""
    fit = SimilarityTransform.from_estimate(_points(meta), ARCFACE_DST_112)
    assert fit, fit
    ref = cv2.warpAffine(image.numpy(), fit.params[:2], (112, 112), borderValue=0)
    diff = np.abs(ref.astype(int) - crop.astype(int))
    # float32 fit in the stage vs float64 here: one grey level in rare rounding ties (measured: under 0.03 %)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (meta.source, diff.max(), (diff > 0).mean())


def test_found_missed_failed_counts_and_rows(folder, aligned):
    items, batch = folder
    assert batch.indices == [ASTRONAUT, T1, TOM, COFFEE] and [f[0] for f in batch.failures] == [BROKEN]
    out, counts = aligned
    assert counts == {"found": 3, "center": 0, "missed": 1, "failed": 1}
    # one ItemMeta per input, in input order; crops rows 0..2 for the three faces
    assert [m.index for m in out.items] == [0, 1, 2, 3, 4]
    assert [(m.group, m.source) for m in out.items] == [(it.group, it.path) for it in items]
    assert [m.row for m in out.items] == [0, 1, 2, -1, -1]
    assert out.crops.shape == (3, 112, 112, 3) and out.crops.dtype == np.uint8 and out.crops.flags.c_contiguous
    assert out.items[COFFEE].skip_reason == "no face" and out.items[COFFEE].lst is None
    assert out.items[BROKEN].skip_reason.startswith("truncated: ") and out.items[BROKEN].lst is None
    for k in (ASTRONAUT, T1, TOM):
        m = out.items[k]
        assert m.skip_reason is None and m.lst.aligned == 0 and m.lst.path == m.source
        x1, y1, x2, y2 = m.lst.bbox
        assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in _points(m))  # landmarks in the box
        np.testing.assert_allclose(_points(m), np.round(_points(m), 2), atol=1e-4)  # train.lst: 2 decimals
        assert out.crops[m.row].std() > 20  # a picture, not a blank
    # t1 is a group photo: the report gets the choice and its runner-up
    note = out.items[T1].note
    assert note["kind"] == "multi-face" and note["faces"] == 6 and note["select"] == "center-largest"
    assert note["chosen"]["score"] >= note["runner_up"]["score"] > 0.9
    assert out.items[ASTRONAUT].note is None and out.items[TOM].note is None


def test_each_crop_is_reproduced_by_its_lst_line(folder, aligned):
    _, batch = folder
    out, _ = aligned
    images = dict(zip(batch.indices, batch.images, strict=True))
    for k in (ASTRONAUT, T1, TOM):
        m = out.items[k]
        _assert_crop_is_the_lst_warp(out.crops[m.row], images[k], m)


@pytest.mark.parametrize("skip_below", [1, 5])  # drop the first input (a found face) / every input
def test_skip_below_leaves_out_written_inputs_and_compacts_rows(folder, aligned, skip_below):
    items, batch = folder
    full, _ = aligned
    out, counts = _stage(items, save_crops="crops")(batch, skip_below)
    assert [m.index for m in out.items] == list(range(skip_below, 5))
    kept = [m for m in full.items if m.index >= skip_below]
    with_crop = [m for m in kept if m.row >= 0]
    # rows re-numbered 0.. in input order; each row holds the same crop as in the uncompacted message
    assert [m.row for m in out.items if m.row >= 0] == list(range(len(with_crop)))
    assert out.crops.shape == (len(with_crop), 112, 112, 3)
    for m, ref in zip((m for m in out.items if m.row >= 0), with_crop, strict=True):
        assert np.array_equal(out.crops[m.row], full.crops[ref.row])
        assert dataclasses.replace(m, row=ref.row) == ref
    assert counts == {
        "found": len(with_crop),
        "center": 0,
        "missed": int(skip_below <= COFFEE),
        "failed": int(skip_below <= BROKEN),
    }


def test_lst_landmarks_are_used_not_detected_again(tmp_path, photo_path):
    _make_tree(tmp_path / "src", photo_path)
    src = tmp_path / "src"
    # face2rec2 lines (aligned, path, label, box, x1..x5, y1..y5) typed out by hand
    lines = [
        # the astronaut's face, roughly where MTCNN puts it
        "0\tanna/astronaut.png\t0\t170\t60\t270\t175\t196\t236\t218\t205\t240\t101\t96\t125\t151\t146",
        # five points on the coffee cup: there is no face, yet the line's landmarks are warped as given
        "0\tben/coffee.png\t1\t100\t80\t200\t180\t120\t170\t145\t125\t165\t110\t110\t135\t160\t160",
        "0\tanna/t1.jpg\t1",  # no landmarks: detected
        # eyes on one point, then points far outside the 106×106 photo: bad landmarks, never detected instead
        "0\tben/Tom_Hanks_54745.png\t2\t0\t0\t80\t100\t40\t40\t50\t35\t60\t50\t50\t70\t90\t90",
        "0\tben/Tom_Hanks_54745.png\t2\t0\t0\t80\t100\t5030\t5070\t5050\t5035\t5060\t50\t50\t70\t90\t90",
    ]
    lst = src / "in.lst"
    lst.write_text("\n".join(lines) + "\n")
    items = scan_source(lst).items
    assert items[0].landmarks is not None and items[2].landmarks is None
    batch = _decode(items)
    assert batch.failures == []  # the bad landmarks are the stage's to report
    out, counts = _stage(items)(batch, 0)
    assert counts == {"found": 3, "center": 0, "missed": 0, "failed": 2}
    astro, coffee, t1, eyes, outside = out.items
    # the given points are the line's, unchanged (not MTCNN's), and so is the box
    np.testing.assert_array_equal(_points(astro), [[196, 101], [236, 96], [218, 125], [205, 151], [240, 146]])
    assert astro.lst.bbox == (170, 60, 270, 175)
    np.testing.assert_array_equal(_points(coffee), [[120, 110], [170, 110], [145, 135], [125, 160], [165, 160]])
    assert coffee.skip_reason is None and coffee.row == 1  # the detector finds no face there (see above)
    assert t1.row == 2 and t1.lst.bbox is not None and t1.note["faces"] == 6  # detected
    assert eyes.row == -1 and eyes.skip_reason.startswith("bad landmarks: eyes on one point")
    assert outside.row == -1 and outside.skip_reason.startswith("bad landmarks: left eye at (5030.0, 50.0)")
    images = dict(zip(batch.indices, batch.images, strict=True))
    assert [m.crop_name for m in out.items] == [""] * 5  # no --save-crops
    for m in (astro, coffee, t1):
        _assert_crop_is_the_lst_warp(out.crops[m.row], images[m.index], m)


def _center(items: list[InputItem], image: torch.Tensor):
    """The stage with ``--on-miss center`` on one photo without a face (input ``COFFEE``)."""
    return _stage(items, on_miss="center")(DecodedBatch([COFFEE], [image], []), 0)


def test_on_miss_center_gives_insightface_fallback(folder):
    items, batch = folder
    image = batch.images[batch.indices.index(COFFEE)]
    out, counts = _center(items, image)
    assert counts == {"found": 0, "center": 1, "missed": 0, "failed": 0}
    (m,) = out.items
    coffee = image.numpy()
    H, W = coffee.shape[:2]
    assert m.row == 0 and m.skip_reason is None and m.lst.bbox == (0, 0, W, H) and m.crop_name == ""
    # InsightFace's no-face fallback (face_preprocess: 6.25 % inset, 22 px margin, cv2.resize to 112×112)
    x0, y0 = max(int(W * 0.0625) - 22, 0), max(int(H * 0.0625) - 22, 0)
    x1, y1 = min(W - int(W * 0.0625) + 22, W), min(H - int(H * 0.0625) + 22, H)
    ref = cv2.resize(coffee[y0:y1, x0:x1], (112, 112))
    assert np.abs(ref.astype(int) - out.crops[0].astype(int)).mean() < 0.5


def _lst_items(tmp_path: Path, lines: list[str]) -> list[InputItem]:
    """The items of a ``.lst`` holding ``lines`` (paths as written)."""
    lst = tmp_path / "given.lst"
    lst.write_text("".join(f"{line}\n" for line in lines))
    return scan_source(lst).items


@pytest.mark.parametrize("shape", ["square", "landscape"])
def test_on_miss_center_lst_line_reproduces_the_crop(folder, tmp_path, shape):
    """The centre crop's train.lst line (the whole photo as its box, the template mapped back through the centre-crop
    affine as its landmarks) gives the stored crop back, bit for bit, when a .lst run takes it as given landmarks:
    those landmarks are recognised as the photo's centre crop and warped with its affine, not with a similarity fit,
    which cannot reproduce the crop of a non-square photo (x and y scale differently)."""
    items, batch = folder
    image = batch.images[batch.indices.index(COFFEE)]  # 400×600
    if shape == "square":
        image = image[:, 100:500].contiguous()
    out, _ = _center(items, image)
    (m,) = out.items
    H, W = image.shape[:2]
    assert m.lst.bbox == (0, 0, W, H)
    fit = SimilarityTransform.from_estimate(_points(m), ARCFACE_DST_112)
    fitted = cv2.warpAffine(image.numpy(), fit.params[:2], (112, 112), borderValue=0)
    differ = (fitted != out.crops[0]).mean()
    # what a similarity refit gives instead: close on a square photo, another crop on a landscape one
    assert differ > 0.5 if shape == "landscape" else differ < 0.05, differ

    # the line as a .lst gives: the same crop, the same line, counted as a centre crop (on_miss skip, the default)
    given = _lst_items(tmp_path, [format_lst_line(dataclasses.replace(m.lst, path=items[COFFEE].path))])
    again, counts = _stage(given)(DecodedBatch([0], [image], []), 0)
    assert counts == {"found": 0, "center": 1, "missed": 0, "failed": 0}
    (m2,) = again.items
    assert np.array_equal(again.crops[0], out.crops[0])
    assert m2.lst == m.lst and m2.row == 0 and m2.skip_reason is None

    # a face that is not the centre crop's (one number 0.02 px off) is fitted and warped as a face
    lms = list(m.lst.landmarks)
    lms[0] += 0.02
    off = dataclasses.replace(m.lst, path=items[COFFEE].path, landmarks=tuple(lms))
    again, counts = _stage(_lst_items(tmp_path, [format_lst_line(off)]))(DecodedBatch([0], [image], []), 0)
    assert counts == {"found": 1, "center": 0, "missed": 0, "failed": 0}
    _assert_crop_is_the_lst_warp(again.crops[0], image, again.items[0])


def test_pack_of_an_on_miss_center_run_rebuilds_identical_records(tmp_path, photo_path):
    """`gpu-align run --on-miss center` on photos with a 400×600 scene without a face, then `gpu-align pack` of its
    train.lst (no detection): byte-identical train.rec, train.idx, train.lst and property (README's promise)."""
    src = tmp_path / "src"
    for folder, names in {"anna": ("astronaut",), "ben": ("coffee", "tom_hanks")}.items():
        (src / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(photo_path(name), src / folder / photo_path(name).name)
    common = ["--device", "cpu", "--decoder", "cpu", "--batch-size", "4", "-q"]
    assert gpu_align_cli(["run", str(src), "--out", str(tmp_path / "run"), "--on-miss", "center", *common]) == 0
    lines = (tmp_path / "run" / "train.lst").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and "\t0\t0\t600\t400\t" in next(ln for ln in lines if "coffee" in ln)  # the centre crop
    assert gpu_align_cli(["pack", str(tmp_path / "run" / "train.lst"), "--out", str(tmp_path / "pack"), "-q"]) == 0
    for name in ("train.rec", "train.idx", "train.lst", "property"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "pack" / name).read_bytes(), name
    counts = [json.loads((tmp_path / d / "report.json").read_text(encoding="utf-8"))["extra"]["run"]["this_invocation"]
              for d in ("run", "pack")]
    assert [(c["found"], c["center"]) for c in counts] == [(2, 1), (2, 1)]


def test_crop_names_are_unique_per_identity():
    paths = [
        ("a", "/x/a.jpg"),
        ("a", "/x/a.JPG"),
        ("a", "/x/a.jpeg"),
        ("a", "/x/b.png"),
        ("a", "/y/b.png"),  # one name from two folders of a .lst
        ("a", "/x/A.jpg"),  # names compare as written
        ("b", "/x/a.jpg"),  # another identity: its own folder
        ("c", "/x/a.jpg"),
        ("c", "/x/a.jpeg"),
        ("c", "/x/a.jpg.jpg"),  # its name is what renaming the first gives
    ]
    items = [InputItem(k, p, g) for k, (g, p) in enumerate(paths)]
    names = crop_names(items)
    assert names == [
        "a.jpg.jpg",
        "a.JPG.jpg",
        "a.jpeg.jpg",
        "b.png.jpg",
        "b.png_2.jpg",
        "A.jpg",
        "a.jpg",
        "a.jpg.jpg",
        "a.jpeg.jpg",
        "a.jpg_2.jpg",
    ]
    for g in "abc":
        mine = [n for (gg, _), n in zip(paths, names, strict=True) if gg == g]
        assert len(set(mine)) == len(mine)


def test_stage_names_the_crops_with_save_crops(aligned):
    out, _ = aligned
    # the three with a crop get crop_names' names; without --save-crops every name is "" (the .lst and centre tests)
    assert [m.crop_name for m in out.items] == ["astronaut.png.jpg", "t1.jpg", "Tom_Hanks_54745.png.jpg", "", ""]
