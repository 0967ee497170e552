"""FaceAligner: face selection, misses, mixed-size batches and equivariance on the shipped real photos."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch

from gpu_align import FaceAligner
from gpu_align.aligner import AlignResult, refine_landmarks
from gpu_align.mtcnn import Detections
from gpu_align.select import POLICIES, face_keys, select_faces
from gpu_align.warp import align_faces, arcface_template, estimate_similarity, transform_points, warp_faces
from packer.errors import UserError

FACE_PHOTOS = ("astronaut", "camera", "t1", "tom_hanks", "messi")


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()  # dataset defaults: center-largest, min_face_rel 0.1, refined landmarks


@pytest.fixture(scope="module")
def photos_rgb(load_photo) -> dict[str, np.ndarray]:
    out = {}
    for name in (*FACE_PHOTOS, "coffee", "tiny"):
        with contextlib.suppress(pytest.skip.Exception):  # messi is optional (opencv-doc)
            out[name] = load_photo(name)
    return out


@pytest.fixture(scope="module")
def t1_all(photos_rgb) -> Detections:
    """Every face of the group photo t1.jpg (no relative minimum), refined landmarks."""
    return FaceAligner(min_face_rel=0).detect([photos_rgb["t1"]])[0]


# --- selection policy on synthetic detections ------------------------------------------------------------------


class _Det(NamedTuple):
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor


def _dets(boxes, scores) -> _Det:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    lm = torch.zeros((b.shape[0], 5, 2))
    lm[:, :, 0] = b[:, :1]  # distinguishable landmarks: x = box x1
    return _Det(b, torch.tensor(scores, dtype=torch.float32), lm)


def test_select_policies_on_synthetic_detections():
    # image 0 (100×200 H×W): a big face off to the left, a smaller one in the centre, a confident small one
    img0 = _dets([[0, 0, 60, 60], [80, 30, 120, 70], [150, 80, 160, 90]], [0.9, 0.95, 0.99])
    img1 = _dets([], [])  # no face
    img2 = _dets([[10, 10, 20, 20], [10, 10, 20, 20]], [0.8, 0.8])  # a tie: the first wins
    hw = [(100, 200), (50, 50), (40, 40)]
    expected = {"center-largest": 1, "largest": 0, "best-score": 2, "center": 1}
    for policy in POLICIES:
        found, boxes, scores, lms, n = select_faces([img0, img1, img2], hw, policy)
        assert found.tolist() == [True, False, True]
        assert n.tolist() == [3, 0, 2]
        assert torch.equal(boxes[0], img0.boxes[expected[policy]]), policy
        assert scores[0] == img0.scores[expected[policy]]
        assert torch.equal(lms[0], img0.landmarks[expected[policy]])
        assert torch.isnan(boxes[1]).all() and torch.isnan(scores[1]) and torch.isnan(lms[1]).all()
        assert torch.equal(boxes[2], img2.boxes[0])
    # InsightFace's formula: area - 2·offset² (the big off-centre face loses to the centred one here)
    keys = face_keys("center-largest", img0.boxes, img0.scores, torch.tensor([[100.0, 200.0]]).expand(3, 2))
    assert keys[0] == pytest.approx(3600 - 2 * ((30 - 100) ** 2 + (30 - 50) ** 2))
    # a callable policy: prefer the smallest box
    smallest = lambda b, s, lm, hw: -(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    found, boxes, *_ = select_faces([img0, img1, img2], hw, smallest)
    assert torch.equal(boxes[0], img0.boxes[2])
    with pytest.raises(ValueError, match="unknown face-selection policy"):
        select_faces([img0], hw[:1], "biggest")
    # no images, no faces at all
    assert select_faces([], [], "largest")[0].shape == (0,)
    assert not select_faces([img1, img1], hw[:2], "largest")[0].any()


def test_select_policies_on_t1_group_photo(photos_rgb, t1_all):
    """t1.jpg: six faces (MTCNN also fires on a hand and a glass). Each policy picks what it promises."""
    img = photos_rgb["t1"]
    H, W = img.shape[:2]
    boxes, scores = t1_all.boxes.numpy(), t1_all.scores.numpy()
    assert (scores > 0.95).sum() == 6 and len(scores) >= 6
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    off2 = ((boxes[:, 0] + boxes[:, 2]) / 2 - W / 2) ** 2 + ((boxes[:, 1] + boxes[:, 3]) / 2 - H / 2) ** 2
    expected = {
        "center-largest": int(np.argmax(area - 2 * off2)),
        "largest": int(np.argmax(area)),
        "best-score": int(np.argmax(scores)),
        "center": int(np.argmin(off2)),
    }
    picks = {}
    for policy in POLICIES:
        res = FaceAligner(select=policy, min_face_rel=0).align([img], detections=[t1_all])
        assert res.found.tolist() == [True] and res.num_faces.tolist() == [len(scores)]
        picks[policy] = int(np.argmin(np.abs(boxes - res.boxes[0].numpy()).sum(1)))
        assert picks[policy] == expected[policy], policy
        if policy != "center":  # "center" may pick the glass near the middle: that is what it promises
            assert scores[picks[policy]] > 0.95  # a real face, not the hand or the glass
    assert len(set(picks.values())) >= 2  # the policies really differ on this photo
    # the default (centre-largest) face is the man in the middle: its box centre is within 20 % of the centre
    b = boxes[picks["center-largest"]]
    assert abs((b[0] + b[2]) / 2 - W / 2) < 0.2 * W and abs((b[1] + b[3]) / 2 - H / 2) < 0.2 * H


# --- dataset mode: batches, misses, fallbacks ------------------------------------------------------------------


def _mixed_batch(photos_rgb):
    imgs = [photos_rgb[n] for n in ("t1", "astronaut", "tom_hanks", "camera")]
    names = ["t1", "astronaut", "tom_hanks", "camera"]
    if "messi" in photos_rgb:
        imgs.append(photos_rgb["messi"])
        names.append("messi")
    gray = np.ascontiguousarray(photos_rgb["astronaut"][..., 1])  # (H, W) grayscale
    rgba = np.dstack([photos_rgb["astronaut"], np.full(photos_rgb["astronaut"].shape[:2], 255, np.uint8)])
    imgs += [photos_rgb["coffee"], photos_rgb["tiny"], gray, rgba, photos_rgb["astronaut"].astype(np.float32)]
    names += ["coffee", "tiny", "gray", "rgba", "float"]
    return imgs, names


def test_align_mixed_size_batch_reports_misses(aligner, photos_rgb):
    imgs, names = _mixed_batch(photos_rgb)
    res = aligner.align(imgs)
    assert isinstance(res, AlignResult) and len(res) == len(imgs)
    assert res.crops.shape == (len(imgs), 112, 112, 3) and res.crops.dtype == torch.uint8
    by = dict(zip(names, range(len(names)), strict=True))
    for n in ("t1", "astronaut", "tom_hanks", "camera", "messi", "gray", "rgba"):
        if n in by:
            assert res.found[by[n]] and res.miss_reason[by[n]] is None, n
            assert res.crops[by[n]].float().std() > 20  # a real picture, not a blank
    assert res.miss_reason[by["coffee"]] == "no face" and not res.ok[by["coffee"]]
    assert res.miss_reason[by["tiny"]].startswith("image too small")
    assert res.miss_reason[by["float"]].startswith("unsupported image: dtype float32")
    assert not res.center.any()
    misses = ~res.found
    assert (res.crops[misses] == 0).all() and torch.isnan(res.boxes[misses]).all()
    assert torch.isnan(res.transforms[misses]).all()
    # grayscale and RGBA versions of the astronaut align to (nearly) the same place as the RGB one
    for n in ("gray", "rgba"):
        assert (res.landmarks[by[n]] - res.landmarks[by["astronaut"]]).abs().max() < 3.0
    # the crop is the photo warped by the reported transform, and that transform maps the landmarks onto the
    # ArcFace template (least squares: within a few pixels)
    i = by["astronaut"]
    ref = cv2.warpAffine(photos_rgb["astronaut"], res.transforms[i].numpy(), (112, 112), borderValue=0)
    assert np.abs(ref.astype(int) - res.crops[i].numpy()).max() <= 1
    mapped = transform_points(res.transforms[i : i + 1], res.landmarks[i : i + 1])[0]
    assert (mapped - arcface_template()).norm(dim=1).max() < 10  # her smile is wider than the template's


def test_batch_invariance(aligner, photos_rgb):
    """A photo aligns the same alone and inside a mixed-size batch (the batched detector keeps images apart)."""
    imgs, _ = _mixed_batch(photos_rgb)
    batch = aligner.align(imgs)
    alone = aligner.align([imgs[1]])
    assert torch.allclose(alone.landmarks[0], batch.landmarks[1], atol=0.05)
    assert (alone.crops[0].int() - batch.crops[1].int()).abs().max() <= 1


def test_on_miss_center_gives_flagged_insightface_fallback(photos_rgb):
    al = FaceAligner(on_miss="center")
    imgs = [photos_rgb["coffee"], photos_rgb["astronaut"], photos_rgb["tiny"], np.zeros((5, 5), np.float64)]
    res = al.align(imgs)
    assert res.found.tolist() == [False, True, False, False]
    assert res.center.tolist() == [True, False, True, False]  # the unreadable image gets no crop at all
    assert res.ok.tolist() == [True, True, True, False]
    assert res.miss_reason[0] == "no face" and res.miss_reason[2].startswith("image too small")
    assert res.miss_reason[1] is None and res.miss_reason[3].startswith("unsupported image")
    # the fallback crop is InsightFace's: 6.25 % inset + 22 px margin, resized to 112×112
    coffee = photos_rgb["coffee"]
    H, W = coffee.shape[:2]
    x0, y0 = max(int(W * 0.0625) - 22, 0), max(int(H * 0.0625) - 22, 0)
    x1, y1 = min(W - int(W * 0.0625) + 22, W), min(H - int(H * 0.0625) + 22, H)
    ref = cv2.resize(coffee[y0:y1, x0:x1], (112, 112))
    assert np.abs(ref.astype(int) - res.crops[0].numpy()).mean() < 0.5
    assert (res.crops[3] == 0).all()


def test_detect_then_align_equals_align(aligner, photos_rgb):
    imgs = [photos_rgb["t1"], photos_rgb["astronaut"], photos_rgb["coffee"]]
    dets = aligner.detect(imgs)
    assert [len(d.scores) > 0 for d in dets] == [True, True, False]
    for d in dets:
        assert d.boxes.shape[1:] == (4,) and d.landmarks.shape[1:] == (5, 2) and d.scores.dim() == 1
    a = aligner.align(imgs, detections=dets)
    b = aligner.align(imgs)
    assert torch.equal(a.found, b.found)
    assert torch.allclose(a.landmarks[a.found], b.landmarks[b.found], atol=0.05)


def test_min_face_rel_keeps_the_main_face(photos_rgb):
    """The detection scale policy (faces ≥ 10 % of the shorter side) still finds each photo's target face."""
    fast, full = FaceAligner(refine=False), FaceAligner(min_face_rel=0, refine=False)
    imgs = [photos_rgb[n] for n in FACE_PHOTOS if n in photos_rgb]
    a, b = fast.align(imgs), full.align(imgs)
    assert a.found.all() and b.found.all()
    assert torch.allclose(a.boxes, b.boxes, atol=6)  # the same face (re-detected at a coarser pyramid start)


def test_refine_false_is_raw_mtcnn(photos_rgb):
    img = photos_rgb["astronaut"]
    raw = FaceAligner(refine=False, min_face_rel=0)
    d = raw.mtcnn.detect([img])[0]
    res = raw.align([img])
    assert torch.equal(res.landmarks[0], d.landmarks[0])
    crops, _ = align_faces([torch.from_numpy(img.copy())], [0], d.landmarks[:1])
    assert torch.equal(res.crops[0], crops[0])


def test_refine_landmarks_is_stable_at_its_fixed_point(aligner, photos_rgb):
    """Refining refined landmarks again moves them by a small fraction of the inter-ocular distance."""
    img = torch.from_numpy(photos_rgb["t1"].copy())
    d = aligner.detect([img])[0]
    again = refine_landmarks(aligner.mtcnn.onet, [img], [0] * len(d.scores), d.landmarks)
    iod = (d.landmarks[:, 1] - d.landmarks[:, 0]).norm(dim=1)
    moved = (again - d.landmarks).norm(dim=2).mean(1) / iod
    assert moved[d.scores > 0.95].max() < 0.02


def test_user_errors():
    with pytest.raises(UserError, match="face-selection policy"):
        FaceAligner(select="biggest")
    with pytest.raises(UserError, match="on_miss"):
        FaceAligner(on_miss="drop")
    with pytest.raises(UserError, match="multiple of 112 or 128"):
        FaceAligner(image_size=100)
    with pytest.raises(UserError, match="min_face_rel"):
        FaceAligner(min_face_rel=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            FaceAligner(device="cuda")
    with pytest.raises(UserError, match="fp16"):
        FaceAligner(fp16=True)


def test_image_size_variants(photos_rgb):
    img = photos_rgb["astronaut"]
    r112 = FaceAligner().align([img])
    for size in (224, 128):
        r = FaceAligner(image_size=size).align([img])
        assert r.crops.shape == (1, size, size, 3)
        # the same face: landmarks identical, transform = the 112 one scaled (and shifted for 128)
        assert torch.allclose(r.landmarks, r112.landmarks)
        k = size / 112 if size % 112 == 0 else size / 128
        lm = transform_points(r.transforms, r.landmarks)[0]
        assert torch.allclose(
            lm,
            transform_points(r112.transforms, r112.landmarks)[0] * k
            + (8 * k if size == 128 else 0) * torch.tensor([1.0, 0]),
            atol=1e-3,
        )


# --- equivariance under real photo transforms ------------------------------------------------------------------


def _random_view(img: np.ndarray, rng: np.random.Generator):
    """Rotate ±30°, scale 0.5–2×, shift ±10 % onto a canvas that holds the whole rotated photo, JPEG q75–95."""
    H, W = img.shape[:2]
    angle, scale = np.deg2rad(rng.uniform(-30, 30)), rng.uniform(0.5, 2.0)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    cw = int(np.ceil(W * abs(c) + H * abs(s)))
    ch = int(np.ceil(W * abs(s) + H * abs(c)))
    A = np.array([[c, -s], [s, c]])
    t = np.array([cw / 2, ch / 2]) + rng.uniform(-0.1, 0.1, 2) * [cw, ch] - A @ [W / 2, H / 2]
    M = np.hstack([A, t[:, None]])
    canvas = cv2.warpAffine(img, M, (cw, ch), flags=cv2.INTER_LINEAR, borderValue=0)
    q = int(rng.integers(75, 96))
    ok, enc = cv2.imencode(".jpg", canvas[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]), M


@pytest.mark.slow
def test_landmarks_and_crops_follow_photo_transforms(photos_rgb):
    """Every face of the five photos, under random similarity transforms + JPEG: the detected landmarks follow
    the known transform, and the aligned crops agree.

    Landmarks: mean error of the five points ≤ 5 % of the inter-ocular distance on ≥ 95 % of face-trials (a
    trial = one face of the original photo that lies inside the transformed canvas; a face not re-detected counts
    as a failure).

    Crops: the bound on the mean absolute difference (MAD, grey levels) between the original's aligned crop and
    the transformed photo's is calibrated per trial, because resampling (down to 0.5×) and JPEG change the crop
    even with perfect landmarks, by an amount that depends on the face's texture and scale. The reference is the
    *oracle* crop (warped from the transformed photo with the exactly transformed original landmarks) moved by
    the landmark tolerance, 5 % of the template's inter-ocular distance (1.76 px), in each of the four axis
    directions. The detected crop must be at least as close to the original's crop as those shifted oracles are
    (on average over the four) on ≥ 95 % of trials: i.e. the crops agree within what the landmark tolerance allows.

    Measured with this seed: 96 % of landmarks and 98 % of crops within bounds, median landmark error 0.5 % of the
    IOD, median crop MAD 2.7 (oracle 2.2). Other seeds (7, 8, 9) give 96–99 % and 94–99 %: the property holds
    a few points above the bar, not by a wide margin. The misses are faces MTCNN loses or mislocates at a large
    total roll (the ±30° photo rotation plus the face's own tilt) and camera.png's near-profile face, whose far eye
    is hidden. Without landmark refinement (raw MTCNN landmarks) only ~30 % are within 5 %.
    """
    aligner = FaceAligner(min_face_rel=0.05)  # t1's faces are ~12 % of its shorter side: keep them all
    tmpl = arcface_template()
    tol = 0.05 * float((tmpl[1] - tmpl[0]).norm())
    shifts = torch.tensor([[tol, 0.0], [-tol, 0.0], [0.0, tol], [0.0, -tol]], dtype=torch.float64)
    rng = np.random.default_rng(2024)
    trials_per_photo = 10
    lm_err, crop_ok, crop_mad, oracle_mad = [], [], [], []
    for name in FACE_PHOTOS:
        if name not in photos_rgb:
            continue
        img = photos_rgb[name]
        d0 = aligner.detect([img])[0]
        keep = d0.scores > 0.95
        l0 = d0.landmarks[keep].double().numpy()
        c0 = align_faces([torch.from_numpy(img.copy())], [0] * len(l0), torch.from_numpy(l0))[0].numpy()
        for _ in range(trials_per_photo):
            canvas, M = _random_view(img, rng)
            l1 = aligner.detect([canvas])[0].landmarks.double().numpy()
            H1, W1 = canvas.shape[:2]
            for k in range(len(l0)):
                exp = l0[k] @ M[:, :2].T + M[:, 2]
                if exp.min() < 0 or (exp[:, 0] >= W1).any() or (exp[:, 1] >= H1).any():
                    continue  # the face left the canvas
                if len(l1) == 0:
                    lm_err.append(np.inf)
                    crop_ok.append(False)
                    continue
                j = int(np.argmin(np.linalg.norm(l1.mean(1) - exp.mean(0), axis=1)))
                lm_err.append(np.linalg.norm(l1[j] - exp, axis=1).mean() / np.linalg.norm(exp[1] - exp[0]))
                # detected, oracle, and the oracle shifted by the tolerance in four directions
                Ms = estimate_similarity(torch.from_numpy(np.stack([l1[j], exp])), tmpl.double())
                shifted = Ms[1:2].repeat(4, 1, 1)
                shifted[:, :, 2] += shifts
                crops = warp_faces([torch.from_numpy(canvas)], [0] * 6, torch.cat([Ms, shifted]), 112).numpy()
                mads = np.abs(crops.astype(int) - c0[k]).mean(axis=(1, 2, 3))
                crop_mad.append(mads[0])
                oracle_mad.append(mads[1])
                crop_ok.append(mads[0] <= mads[2:].mean())
    lm_err = np.array(lm_err)
    summary = (
        f"{len(lm_err)} face-trials: landmark error/IOD median {np.median(lm_err):.4f}, "
        f"≤5 %: {(lm_err <= 0.05).mean():.3f}; crop MAD median {np.median(crop_mad):.1f} "
        f"(oracle {np.median(oracle_mad):.1f}), within the shifted-oracle bound: {np.mean(crop_ok):.3f}"
    )
    print(summary)
    assert len(lm_err) >= 30, summary
    assert (lm_err <= 0.05).mean() >= 0.95, summary
    assert np.mean(crop_ok) >= 0.95, summary


# --- CUDA ------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("opts", [{}, {"fp16": True, "channels_last": True}])
def test_cuda_matches_cpu(photos_rgb, opts):
    imgs, _ = _mixed_batch(photos_rgb)
    cpu = FaceAligner().align(imgs)
    gpu = FaceAligner(device="cuda", **opts).align([torch.from_numpy(np.ascontiguousarray(i)) for i in imgs])
    assert gpu.crops.device.type == "cuda" and gpu.found.device.type == "cuda"
    assert gpu.found.cpu().tolist() == cpu.found.tolist()
    assert gpu.miss_reason == cpu.miss_reason
    f = cpu.found
    iod = (cpu.landmarks[f][:, 1] - cpu.landmarks[f][:, 0]).norm(dim=1)
    err = (gpu.landmarks.cpu()[f] - cpu.landmarks[f]).norm(dim=2).mean(1) / iod
    assert err.max() < (0.03 if opts else 0.01)
    assert (gpu.crops.cpu()[f].float() - cpu.crops[f].float()).abs().mean() < (6 if opts else 2)
