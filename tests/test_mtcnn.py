"""Batched MTCNN (gpu_align.detect.mtcnn and its parts) on the real shipped photos, against facenet-pytorch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpu_align.demo import photos
from gpu_align.detect import nms as nms_mod
from gpu_align.detect.mtcnn import MTCNN, Detections, MTCNNWeightsMissing, mtcnn_weights_dir
from gpu_align.detect.mtcnn import model as mtcnn_mod
from gpu_align.detect.mtcnn.pyramid import plan_pyramid
from gpu_align.detect.mtcnn.resample import integral_images, resample_crops, resample_levels_into, resample_ragged_into
from gpu_align.detect.nms import batched_nms
from packer.errors import UserError

FACES = {"astronaut": 1, "camera": 1, "t1": 6, "tom_hanks": 1, "messi": 1}
# Face centres in t1.jpg (the six people; checked by eye on a drawing of the detections).
T1_FACE_CENTRES = [(961, 132), (110, 330), (793, 410), (322, 211), (518, 333), (1181, 336)]


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


@pytest.fixture(scope="module")
def single(detector, photos_rgb) -> dict[str, Detections]:
    """One-image calls: the baseline the batched calls must equal."""
    return {name: detector.detect([im])[0] for name, im in photos_rgb.items()}


def _confident(d: Detections, thr: float = 0.9) -> Detections:
    keep = d.scores > thr
    return Detections(d.boxes[keep], d.scores[keep], d.landmarks[keep])


@contextlib.contextmanager
def _pnet_pixels(detector: MTCNN) -> Iterator[list[int]]:
    """Pixels of every input P-Net's first convolution runs on inside the block (pages x height x width)."""
    seen: list[int] = []
    hook = detector.pnet.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0][:, 0].numel()))
    try:
        yield seen
    finally:
        hook.remove()


def _assert_same(a: Detections, b: Detections, atol: float = 1e-3) -> None:
    assert a.boxes.shape == b.boxes.shape
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.landmarks, b.landmarks, atol=atol, rtol=0)


# --- weights ------------------------------------------------------------------------------------------------------


def test_weights_dir_has_the_three_networks():
    folder = mtcnn_weights_dir()
    assert {"pnet.pt", "rnet.pt", "onet.pt"} <= {p.name for p in folder.iterdir()}


def test_missing_weights_say_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(MTCNNWeightsMissing, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        MTCNN(weights_dir=tmp_path)
    # Package not installed at all: same hint, and it is a UserError (one line in the CLI).
    monkeypatch.setattr(mtcnn_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"facenet-pytorch is not installed; run: pip install --no-deps"):
        mtcnn_weights_dir()


# --- accuracy on real photos --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACES))
def test_every_face_found_with_high_score(name, single, photos_rgb):
    if name not in photos_rgb:
        pytest.skip(f"{name} not installed")
    d = _confident(single[name])
    assert len(d.scores) == FACES[name], d.scores
    # Distinct faces: confident boxes do not overlap each other.
    b = d.boxes
    for i in range(len(b)):
        for j in range(i + 1, len(b)):
            ix = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
            iy = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
            assert ix <= 0 or iy <= 0
    if name == "t1":
        for cx, cy in T1_FACE_CENTRES:
            inside = (b[:, 0] < cx) & (cx < b[:, 2]) & (b[:, 1] < cy) & (cy < b[:, 3])
            assert int(inside.sum()) == 1, (cx, cy)
    else:  # one face: the box is face-sized (from 1/15 of the short side, messi, to all of it, tom_hanks)
        side = float(b[0, 2] - b[0, 0])
        short = min(photos_rgb[name].shape[:2])
        assert short / 15 < side < short * 1.2


@pytest.mark.parametrize("name", photos.NON_FACE_PHOTOS)
def test_no_confident_false_positive_on_scenes(name, single):
    assert not (single[name].scores > 0.9).any(), single[name]


def test_landmarks_inside_box_in_anatomical_order(single):
    count = 0
    for name in FACES:
        if name not in single:
            continue
        d = _confident(single[name])
        for box, lm in zip(d.boxes, d.landmarks, strict=True):
            count += 1
            x, y = lm[:, 0], lm[:, 1]
            assert ((x > box[0]) & (x < box[2]) & (y > box[1]) & (y < box[3])).all(), (name, box, lm)
            eye_l, eye_r, nose, mouth_l, mouth_r = lm
            assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1]), (name, lm)
            assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0], (name, lm)
    assert count >= 9


def test_t1_reports_the_known_weak_detections(single):
    # MTCNN also fires on a hand and on a glass in t1.jpg (facenet-pytorch does too), below 0.9.
    weak = single["t1"].scores[single["t1"].scores <= 0.9]
    assert len(weak) == 2 and (weak > 0.8).all()


# --- batching, input types, edge cases ----------------------------------------------------------------------------


def test_batched_mixed_sizes_equal_single_calls(detector, photos_rgb, single):
    names = list(photos_rgb)
    batched = detector.detect([photos_rgb[n] for n in names])
    assert len(batched) == len(names)
    for name, d in zip(names, batched, strict=True):
        _assert_same(d, single[name])
    # Another order, with a repeated image, gives the same per-image results.
    order = [*reversed(names), names[0]]
    for name, d in zip(order, detector.detect([photos_rgb[n] for n in order]), strict=True):
        _assert_same(d, single[name])


def test_numpy_and_torch_inputs_agree(detector, photos_rgb):
    names = ["astronaut", "tom_hanks", "tiny"]
    from_numpy = detector.detect([photos_rgb[n] for n in names])
    tensors = [torch.from_numpy(photos_rgb[n].copy()) for n in names]
    tensors[1] = tensors[1].permute(1, 0, 2).permute(1, 0, 2)  # a non-contiguous view is fine too
    for a, b in zip(from_numpy, detector.detect(tensors), strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.landmarks, b.landmarks)


def test_outputs_are_float32_on_the_detector_device(single):
    d = single["t1"]
    assert d.boxes.dtype == d.scores.dtype == d.landmarks.dtype == torch.float32
    assert d.boxes.shape[1:] == (4,) and d.landmarks.shape[1:] == (5, 2)
    assert d.boxes.device.type == "cpu"
    assert bool((d.scores[:-1] >= d.scores[1:]).all())  # descending score


def test_images_too_small_give_empty_detections(detector, photos_rgb):
    # The 14×25 GIF crashes facenet-pytorch's MTCNN; here it is simply "no face", alone or in a batch.
    blank = np.zeros((0, 5, 3), np.uint8)
    out = detector.detect([photos_rgb["tiny"], blank, np.zeros((11, 300, 3), np.uint8)])
    assert [len(d.scores) for d in out] == [0, 0, 0]
    assert out[0].boxes.shape == (0, 4) and out[0].landmarks.shape == (0, 5, 2)
    mixed = detector.detect([photos_rgb["tiny"], photos_rgb["astronaut"]])
    assert len(mixed[0].scores) == 0 and len(mixed[1].scores) == 1
    assert detector.detect([]) == []


def test_min_face_sizes_skip_small_faces_per_image(detector, photos_rgb, single):
    t1 = photos_rgb["t1"]
    # t1's faces are 93-120 px wide: a 300 px minimum finds none of them; None entries mean the default.
    out = detector.detect([t1, t1], min_face_sizes=[300, None])
    assert not (out[0].scores > 0.9).any()
    _assert_same(out[1], single["t1"])
    # ... and P-Net runs on far fewer pixels (the speed lever for big photos): measured on the detector's own
    # P-Net input, one t1 at a time (default 20 px: ~981k pixels, 60 px: ~120k, 300 px: ~4.6k).
    with _pnet_pixels(detector) as px300:
        detector.detect([t1], min_face_sizes=300)
    with _pnet_pixels(detector) as px60:
        d60 = detector.detect([t1], min_face_sizes=60)  # one number applies to every image
    with _pnet_pixels(detector) as px20:
        detector.detect([t1])
    assert sum(px300) * 10 < sum(px60) and sum(px60) * 4 < sum(px20), (sum(px300), sum(px60), sum(px20))
    assert len(d60[0].scores) >= 6


def test_bad_inputs_get_clear_errors(detector):
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8 RGB image, got shape \(8, 8\)"):
        detector.detect([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        detector.detect([torch.zeros((8, 8, 3))])
    with pytest.raises(TypeError, match="got list"):
        detector.detect([[[0, 0, 0]]])
    with pytest.raises(ValueError, match="2 values for 1 images"):
        detector.detect([np.zeros((8, 8, 3), np.uint8)], min_face_sizes=[20, 20])
    with pytest.raises(ValueError, match="must be > 0"):
        detector.detect([np.zeros((8, 8, 3), np.uint8)], min_face_sizes=0)


def test_work_sizes_and_paths_do_not_change_results(detector, photos_rgb, single):
    # Tiny pages (every level alone), one page per P-Net call, small crop batches, the CUDA default
    # one-gather resampling, channels-last: all the same detections.
    batch = [photos_rgb["t1"][:480, :720], photos_rgb["tom_hanks"], photos_rgb["camera"]]  # t1 crop: 3 faces
    expected = detector.detect(batch)
    assert int((expected[0].scores > 0.9).sum()) == 3
    for options in (
        {"page_side": 64, "pnet_max_pixels": 1, "crop_batch": 7},
        {"pyramid_resample": "flat", "resample_chunk": 5000, "page_side": 4096, "pnet_max_pixels": 1 << 30},
        {"channels_last": True},
    ):
        for got, want in zip(MTCNN(**options).detect(batch), expected, strict=True):
            _assert_same(got, want)


def test_half_precision_networks_find_the_same_faces(photos_rgb, single):
    # float16 is meant for CUDA; on CPU it is slow but exercises the same code (box arithmetic stays float32).
    d = MTCNN(dtype=torch.float16).detect([photos_rgb["astronaut"]])[0]
    assert d.scores.dtype == torch.float32
    torch.testing.assert_close(d.boxes, single["astronaut"].boxes, atol=0.5, rtol=0)


# --- facenet-pytorch's own algorithm as the reference ----------------------------------------------------------------


@pytest.mark.parametrize("name", [*photos.FACE_PHOTOS, *photos.NON_FACE_PHOTOS])
def test_matches_facenet_pytorch_detect_face(name, photos_rgb, single):
    from gpu_align.detect.mtcnn.reference import reference_detect

    if name not in photos_rgb:
        pytest.skip(f"{name} not installed")
    boxes, scores, landmarks = reference_detect(photos_rgb[name])
    ours = single[name]
    assert len(ours.scores) == len(scores)
    np.testing.assert_allclose(ours.boxes.numpy(), boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours.scores.numpy(), scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.landmarks.numpy(), landmarks, atol=1e-3, rtol=0)


def test_matches_facenet_pytorch_with_other_settings(photos_rgb):
    from gpu_align.detect.mtcnn.reference import reference_detect

    im = photos_rgb["messi"] if "messi" in photos_rgb else photos_rgb["astronaut"]
    boxes, scores, landmarks = reference_detect(im, min_face_size=40, thresholds=(0.5, 0.6, 0.6), factor=0.6)
    d = MTCNN(min_face_size=40, thresholds=(0.5, 0.6, 0.6), scale_factor=0.6).detect([im])[0]
    assert len(d.scores) == len(scores)
    np.testing.assert_allclose(d.boxes.numpy(), boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(d.landmarks.numpy(), landmarks, atol=1e-3, rtol=0)
    # facenet-pytorch itself crashes on the tiny GIF (why the guard exists).
    with pytest.raises(ValueError):
        reference_detect(photos_rgb["tiny"])


# --- parts: NMS, resampling, atlas --------------------------------------------------------------------------------


def _greedy(boxes, scores, groups, thr, mode):
    """Textbook greedy NMS, one box at a time (the oracle)."""
    one = 1.0 if mode == "min" else 0.0
    area = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    keep = []
    for g in np.unique(groups):
        alive = [int(i) for i in np.flatnonzero(groups == g)[np.argsort(-scores[groups == g], kind="stable")]]
        while alive:
            i = alive.pop(0)
            keep.append(i)
            rest = np.asarray(alive, dtype=int)
            w = np.maximum(0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + one)
            h = np.maximum(0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + one)
            inter = w * h
            o = inter / np.minimum(area[i], area[rest]) if mode == "min" else inter / (area[i] + area[rest] - inter)
            alive = [r for r, v in zip(alive, o, strict=True) if v <= thr]
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("pair_chunk", [1 << 23, 50])
def test_nms_equals_greedy(mode, pair_chunk, monkeypatch):
    monkeypatch.setattr(nms_mod, "_PAIR_CHUNK", pair_chunk)
    rng = np.random.default_rng(1)
    for n in (1, 2, 40, 400):
        xy = rng.uniform(0, 150, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (n, 2)).astype(np.float32)], axis=1)
        scores = rng.permutation(n).astype(np.float32) / n
        groups = rng.integers(0, 4, n)
        for thr in (0.3, 0.7):
            got = batched_nms(
                torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), thr, mode=mode
            )
            np.testing.assert_array_equal(got.numpy(), _greedy(boxes, scores, groups, thr, mode))
    assert batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


def test_nms_long_suppression_chain():
    # Each box overlaps only its neighbours: greedy keeps every other one (needs many fixed-point rounds).
    x = torch.arange(60, dtype=torch.float32) * 4  # IoU with the next box 0.43, with the one after 0.11
    boxes = torch.stack([x, torch.zeros(60), x + 10, torch.full((60,), 10.0)], dim=1)
    scores = torch.linspace(1, 0.1, 60)
    keep = batched_nms(boxes, scores, torch.zeros(60, dtype=torch.long), 0.3)
    assert keep.tolist() == list(range(0, 60, 2))


def test_crop_resampling_equals_interpolate_area(photos_rgb):
    im = photos_rgb["astronaut"]
    ii = integral_images([torch.from_numpy(photos_rgb["tom_hanks"].copy()), torch.from_numpy(im.copy())])
    regions = [(0, 0, 512, 512), (100, 150, 7, 30), (200, 10, 101, 53), (511, 511, 1, 1), (3, 400, 90, 24)]
    y0, x0, h, w = (torch.tensor(v) for v in zip(*regions, strict=True))
    for size in (24, 48):
        got = resample_crops(ii, torch.ones(len(regions), dtype=torch.long), y0, x0, h, w, size)
        for k, (ry, rx, rh, rw) in enumerate(regions):
            crop = torch.from_numpy(im[ry : ry + rh, rx : rx + rw].copy()).permute(2, 0, 1)[None].float()
            want = F.interpolate(crop, size=(size, size), mode="area")[0]
            assert torch.equal(got[k], want), (size, regions[k])


def test_pyramid_resampling_paths_equal_interpolate_area(photos_rgb):
    tensors = [
        torch.from_numpy(photos_rgb[n].copy()) for n in ("tom_hanks", "messi" if "messi" in photos_rgb else "coffee")
    ]
    ii = integral_images(tensors)
    sizes = [(int(t.shape[0]), int(t.shape[1])) for t in tensors]
    plan = plan_pyramid(sizes, [20.0, 33.0], 0.709, page_side=300)
    pages, height, width = len(plan.page_heights), max(plan.page_heights), plan.page_width
    a = torch.zeros((pages, height, width, 3))
    ids_a = torch.full((pages, height, width), -1, dtype=torch.int32)
    k = len(plan)
    resample_levels_into(ii, *(v.tolist() for v in (plan.image, plan.height, plan.width, plan.page, plan.y, plan.x)),
                         list(range(k)), a, ids_a)  # fmt: skip
    b = torch.zeros((pages, height, width, 3))
    ids_b = torch.full((pages, height, width), -1, dtype=torch.int32)
    t = {n: torch.from_numpy(getattr(plan, n)) for n in ("image", "height", "width", "page", "y", "x")}
    resample_ragged_into(ii, t["image"], t["height"], t["width"], t["page"] * height * width + t["y"] * width + t["x"],
                         torch.full((k,), width), int((plan.height * plan.width).sum()), b.view(-1, 3), ids_b.view(-1),
                         torch.arange(k), max_pixels=777)  # fmt: skip
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b)
    for i in range(k):
        src = tensors[plan.image[i]].permute(2, 0, 1)[None].float()
        want = (F.interpolate(src, size=(int(plan.height[i]), int(plan.width[i])), mode="area")[0] - 127.5) * 0.0078125
        y, x = plan.y[i], plan.x[i]
        got = a[plan.page[i], y : y + plan.height[i], x : x + plan.width[i]].permute(2, 0, 1)
        assert torch.equal(got, want)
        assert (ids_a[plan.page[i], y : y + plan.height[i], x : x + plan.width[i]] == i).all()
    # Placements never overlap and stay at even offsets.
    assert int((ids_a >= 0).sum()) == int((plan.height * plan.width).sum())
    assert (plan.y % 2 == 0).all() and (plan.x % 2 == 0).all()


def test_integral_images_torch_path_equals_numpy_path(photos_rgb):
    # The CUDA path uses torch.cumsum; on CPU numpy's cumsum is used. Both must give the same table.
    im = torch.from_numpy(photos_rgb["chelsea"].copy())
    table = integral_images([im]).table(0)
    expected = torch.zeros_like(table)
    torch.cumsum(im.cumsum(0, dtype=torch.int32), 1, out=expected[1:, 1:])
    assert torch.equal(table, expected)
    assert int(table[-1, -1].sum()) == int(im.sum(dtype=torch.int64))


def test_atlas_pnet_equals_pnet_on_each_level_alone(detector, photos_rgb):
    # Odd and even sizes, partial ceil-mode pool windows at image edges, several images per page.
    tensors = [torch.from_numpy(photos_rgb[n].copy()) for n in ("tom_hanks", "camera")]
    tensors.append(tensors[0][:57, :45])
    ii = integral_images(tensors)
    plan = plan_pyramid([tuple(t.shape[:2]) for t in tensors], [20.0, 90.0, 16.0], 0.709, page_side=256)
    pages, height, width = len(plan.page_heights), max(plan.page_heights), plan.page_width
    atlas = torch.zeros((pages, height, width, 3))
    ids = torch.full((pages, height, width), -1, dtype=torch.int32)
    levels = [v.tolist() for v in (plan.image, plan.height, plan.width, plan.page, plan.y, plan.x)]
    resample_levels_into(ii, *levels, list(range(len(plan))), atlas, ids)
    pnet = detector.pnet
    with torch.inference_mode():
        reg, prob, cell = pnet.forward_atlas(atlas.permute(0, 3, 1, 2).contiguous(), ids)
        for i in range(len(plan)):
            p, y, x, h, w = (int(v[i]) for v in (plan.page, plan.y, plan.x, plan.height, plan.width))
            alone = atlas[p, y : y + h, x : x + w].permute(2, 0, 1)[None].contiguous()
            reg1, prob1 = pnet(alone)
            oh, ow = prob1.shape[1:]
            cy, cx = y // 2, x // 2
            assert (cell[p, cy : cy + oh, cx : cx + ow] == i).all()
            assert int((cell == i).sum()) == oh * ow  # no other cell claims this level
            torch.testing.assert_close(prob[p, cy : cy + oh, cx : cx + ow], prob1[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(reg[p, :, cy : cy + oh, cx : cx + ow], reg1[0], atol=1e-5, rtol=0)


# --- CUDA (skipped without a GPU) -----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_matches_cpu(photos_rgb, single):
    names = list(photos_rgb)
    det = MTCNN(device="cuda")
    out = det.detect([torch.from_numpy(photos_rgb[n].copy()).cuda() for n in names])
    for name, d in zip(names, out, strict=True):
        assert d.boxes.device.type == "cuda"
        _assert_same(Detections(*(t.cpu() for t in d)), single[name], atol=0.05)


@pytest.mark.cuda
def test_cuda_half_channels_last_finds_the_faces(photos_rgb):
    det = MTCNN(device="cuda", dtype=torch.float16, channels_last=True)
    names = [n for n in FACES if n in photos_rgb]
    out = det.detect([photos_rgb[n] for n in names])
    for name, d in zip(names, out, strict=True):
        assert int((d.scores > 0.9).sum()) == FACES[name], name
