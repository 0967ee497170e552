"""FaceAligner: face selection, misses, mixed-size batches and equivariance on the shipped real photos."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from gpu_align import FaceAligner
from gpu_align.align.aligner import CENTER_MATCH_PX, MISS_GIVEN_CENTER, AlignResult, refine_landmarks
from gpu_align.align.warp import (
    align_faces,
    arcface_template,
    center_crop_affine,
    center_crop_landmarks,
    estimate_similarity,
    transform_points,
    warp_faces,
)
from gpu_align.detect.mtcnn import Detections
from gpu_align.detect.select import POLICIES, face_keys, select_faces
from packer.errors import UserError
from tests.photo_files import ARCFACE_DST_112

FACE_PHOTOS = ("astronaut", "camera", "t1", "tom_hanks", "messi")


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()  # dataset defaults: MTCNN, center-largest, min_face_rel 0.1, floor 0.9, raw landmarks


@pytest.fixture(scope="module")
def t1_all(photos_rgb) -> Detections:
    """Every face of the group photo t1.jpg (no relative minimum), raw MTCNN landmarks."""
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


class TestSelectFaces:
    """gpu_align.detect.select.select_faces: policies, confidence floor, runner-up, on synthetic detections."""

    # image 0 (100×200 H×W): a big face off to the left, a smaller one in the centre, a confident small one
    img0 = _dets([[0, 0, 60, 60], [80, 30, 120, 70], [150, 80, 160, 90]], [0.9, 0.95, 0.99])
    img1 = _dets([], [])  # no face
    img2 = _dets([[10, 10, 20, 20], [10, 10, 20, 20]], [0.8, 0.8])  # a tie: the first wins
    hw: ClassVar = [(100, 200), (50, 50), (40, 40)]

    def test_policies(self):
        img0, img1, img2, hw = self.img0, self.img1, self.img2, self.hw
        expected = {"center-largest": 1, "largest": 0, "best-score": 2, "center": 1}
        for policy in POLICIES:
            sel = select_faces([img0, img1, img2], hw, policy)
            assert sel.found.tolist() == [True, False, True]
            assert sel.num_faces.tolist() == [3, 0, 2] and sel.num_confident.tolist() == [3, 0, 2]
            assert torch.equal(sel.boxes[0], img0.boxes[expected[policy]]), policy
            assert sel.scores[0] == img0.scores[expected[policy]]
            assert torch.equal(sel.landmarks[0], img0.landmarks[expected[policy]])
            assert (
                torch.isnan(sel.boxes[1]).all() and torch.isnan(sel.scores[1]) and torch.isnan(sel.landmarks[1]).all()
            )
            assert torch.equal(sel.boxes[2], img2.boxes[0])
        # InsightFace's formula: area - 2·offset² (the big off-centre face loses to the centred one here)
        keys = face_keys("center-largest", img0.boxes, img0.scores, torch.tensor([[100.0, 200.0]]).expand(3, 2))
        assert keys[0] == pytest.approx(3600 - 2 * ((30 - 100) ** 2 + (30 - 50) ** 2))
        # a callable policy: prefer the smallest box
        smallest = lambda b, s, lm, hw: -(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        assert torch.equal(select_faces([img0, img1, img2], hw, smallest).boxes[0], img0.boxes[2])
        with pytest.raises(ValueError, match="unknown face-selection policy"):
            select_faces([img0], hw[:1], "biggest")
        # no images, no faces at all
        assert select_faces([], [], "largest").found.shape == (0,)
        assert not select_faces([img1, img1], hw[:2], "largest").found.any()

    def test_runner_up_is_the_second_choice(self):
        sel = select_faces([self.img0, self.img1, self.img2], self.hw, "largest")
        # largest: box 0 (3600 px²), then box 1 (1600 px²)
        assert (
            torch.equal(sel.runner_up_boxes[0], self.img0.boxes[1]) and sel.runner_up_scores[0] == self.img0.scores[1]
        )
        assert torch.isnan(sel.runner_up_boxes[1]).all() and torch.isnan(sel.runner_up_scores[1])
        assert torch.equal(sel.runner_up_boxes[2], self.img2.boxes[1])  # the tie's other face
        one = select_faces([_dets([[0, 0, 10, 10]], [0.99])], [(20, 20)], "largest")
        assert torch.isnan(one.runner_up_boxes).all()  # a single face has no runner-up

    def test_confidence_floor(self):
        img0, img1, img2, hw = self.img0, self.img1, self.img2, self.hw
        sel = select_faces([img0, img1, img2], hw, "largest", min_score=0.93)
        # box 0 (largest, p 0.90) is below the floor: the largest confident face is box 1; box 2 is the runner-up
        assert sel.found.tolist() == [True, False, False]  # image 2's faces (p 0.8) are all below it
        assert torch.equal(sel.boxes[0], img0.boxes[1]) and torch.equal(sel.runner_up_boxes[0], img0.boxes[2])
        assert sel.num_faces.tolist() == [3, 0, 2] and sel.num_confident.tolist() == [2, 0, 0]
        assert sel.best_score[0] == pytest.approx(0.99) and sel.best_score[2] == pytest.approx(0.8)
        assert torch.isnan(sel.best_score[1]) and torch.isnan(sel.boxes[2]).all()
        # a face exactly at the floor is a candidate
        assert select_faces([img2], hw[2:], "largest", min_score=0.8).found.tolist() == [True]
        # NaN keys rank last but the face is still selectable
        nan_keys = lambda b, s, lm, hw: torch.full_like(s, float("nan"))  # noqa: E731
        assert select_faces([img2], hw[2:], nan_keys).found.tolist() == [True]


def test_select_policies_on_t1_group_photo(photos_rgb, t1_all):
    """t1.jpg: six faces (MTCNN also fires on a hand and a glass, p ≈ 0.86). Each policy picks what it promises
    among the faces above the confidence floor, and never the hand or the glass; without the floor, "center"
    picks the glass."""
    img = photos_rgb["t1"]
    H, W = img.shape[:2]
    boxes, scores = t1_all.boxes.numpy(), t1_all.scores.numpy()
    real = scores > 0.95
    assert real.sum() == 6 and len(scores) == 8 and scores[~real].max() < 0.9  # six faces, a hand and a glass
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    off2 = ((boxes[:, 0] + boxes[:, 2]) / 2 - W / 2) ** 2 + ((boxes[:, 1] + boxes[:, 3]) / 2 - H / 2) ** 2

    def best(key: np.ndarray, among: np.ndarray) -> int:
        return int(np.argmax(np.where(among, key, -np.inf)))

    expected = {
        "center-largest": best(area - 2 * off2, real),
        "largest": best(area, real),
        "best-score": best(scores, real),
        "center": best(-off2, real),
    }
    picks = {}
    for policy in POLICIES:
        res = FaceAligner(select=policy, min_face_rel=0).align([img], detections=[t1_all])
        assert res.found.tolist() == [True] and res.num_faces.tolist() == [8] and res.num_confident.tolist() == [6]
        picks[policy] = int(np.argmin(np.abs(boxes - res.boxes[0].numpy()).sum(1)))
        assert picks[policy] == expected[policy], policy
        assert real[picks[policy]]  # a real face, not the hand or the glass
        runner = int(np.argmin(np.abs(boxes - res.runner_up_boxes[0].numpy()).sum(1)))
        assert real[runner] and runner != picks[policy]
    assert len(set(picks.values())) >= 2  # the policies really differ on this photo
    # without a floor, the box nearest the centre is the glass
    glass = FaceAligner(select="center", min_face_rel=0, min_score=0).align([img], detections=[t1_all])
    assert int(np.argmin(np.abs(boxes - glass.boxes[0].numpy()).sum(1))) == int(np.argmin(off2))
    assert not real[int(np.argmin(off2))]
    # the default (centre-largest) face is the man in the middle: its box centre is within 20 % of the centre
    b = boxes[picks["center-largest"]]
    assert abs((b[0] + b[2]) / 2 - W / 2) < 0.2 * W and abs((b[1] + b[3]) / 2 - H / 2) < 0.2 * H


def test_low_confidence_detections_are_reported_not_selected(photos_rgb, t1_all):
    """A photo whose only detections are below the floor (t1's hand and glass, alone) has no face, and says why."""
    img = photos_rgb["t1"]
    low = t1_all.scores < 0.9
    only_false = Detections(t1_all.boxes[low], t1_all.scores[low], t1_all.landmarks[low])
    res = FaceAligner().align([img], detections=[only_false])
    assert res.found.tolist() == [False] and res.num_faces.tolist() == [2] and res.num_confident.tolist() == [0]
    assert res.miss_reason[0].startswith("no face: low confidence (0.87 < 0.9)"), res.miss_reason[0]
    assert not res.ok.any() and (res.crops == 0).all()


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
    # Each crop is the photo warped by the least-squares similarity from its reported landmarks to InsightFace's
    # template, fitted and warped here independently of the aligner (scikit-image's Umeyama fit in float64,
    # OpenCV's bilinear warpAffine): the transform agrees to 1e-4, the crop to 1 grey level in under 0.1 % of the
    # values (float32 vs float64 fit; measured: at most 0.03 %).
    for n in ("t1", "astronaut", "tom_hanks", "camera", "messi"):
        if n not in by:
            continue
        k = by[n]
        fit = SimilarityTransform.from_estimate(res.landmarks[k].double().numpy(), ARCFACE_DST_112)
        assert fit, (n, fit)
        np.testing.assert_allclose(res.transforms[k].numpy(), fit.params[:2], atol=1e-4, err_msg=n)
        ref = cv2.warpAffine(photos_rgb[n], fit.params[:2], (112, 112), borderValue=0)
        diff = np.abs(ref.astype(int) - res.crops[k].numpy())
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (n, diff.max(), (diff > 0).mean())
    # ... and that transform maps the landmarks onto the ArcFace template (least squares: within a few pixels)
    i = by["astronaut"]
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


def test_given_centre_crop_landmarks_give_the_centre_crop(photos_rgb):
    """The rule that lets a train.lst line rebuild a centre crop: a given face whose landmarks are the photo's
    centre-crop landmarks (within CENTER_MATCH_PX) is warped with the centre-crop affine (an affine with two scales
    on a non-square photo, which no similarity fit reproduces) and reported as a centre crop, whatever on_miss."""
    coffee, astro = photos_rgb["coffee"], photos_rgb["astronaut"]
    square = np.ascontiguousarray(coffee[:, 100:500])
    imgs = [coffee, square, coffee, astro]
    reference = FaceAligner(on_miss="center").align(imgs[:3])
    assert reference.center.tolist() == [True, True, True]
    centre = center_crop_landmarks([im.shape[0] for im in imgs], [im.shape[1] for im in imgs])
    given = torch.round(centre * 100) / 100  # as a train.lst holds them
    given[2, 0, 0] += 2 * CENTER_MATCH_PX  # not the centre crop's: a face
    box = torch.tensor([[0.0, 0.0, 600.0, 400.0]])
    dets = [Detections(box, torch.ones(1), given[k : k + 1]) for k in range(3)] + [None]  # astronaut: detected
    for on_miss in ("skip", "center"):
        res = FaceAligner(on_miss=on_miss).align(imgs, detections=dets)
        assert res.center.tolist() == [True, True, False, False] and res.found.tolist() == [False, False, True, True]
        assert torch.equal(res.crops[:2], reference.crops[:2])
        assert torch.equal(res.transforms[:2], reference.transforms[:2])
        assert res.miss_reason[:2] == [MISS_GIVEN_CENTER] * 2 and res.miss_reason[2:] == [None, None]
        assert torch.isnan(res.landmarks[:2]).all() and torch.isnan(res.boxes[:2]).all()
        assert torch.isnan(res.scores[:2]).all()
        # the face 0.02 px off is fitted as a similarity: another crop of the landscape photo
        fit = estimate_similarity(given[2], arcface_template(112)).float()
        assert torch.allclose(res.transforms[2], fit[0]) and (res.crops[2] != reference.crops[2]).float().mean() > 0.5
    # the centre-crop landmarks are the template mapped back: the centre-crop affine takes them onto it
    back = transform_points(center_crop_affine([400], [600]).double(), centre[:1].double())
    torch.testing.assert_close(back[0].float(), arcface_template(112), atol=1e-4, rtol=0)


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


def test_default_landmarks_are_raw_mtcnn(photos_rgb):
    """By default the crop is warped from MTCNN's own landmarks (InsightFace's reference alignment)."""
    img = photos_rgb["astronaut"]
    raw = FaceAligner(min_face_rel=0)
    d = raw.mtcnn.detect([img])[0]
    res = raw.align([img])
    assert torch.equal(res.landmarks[0], d.landmarks[0])
    crops, _ = align_faces([torch.from_numpy(img.copy())], [0], d.landmarks[:1])
    assert torch.equal(res.crops[0], crops[0])


def test_refine_landmarks_is_stable_at_its_fixed_point(photos_rgb):
    """(Experimental refinement.) Refining refined landmarks again moves them by a small fraction of the IOD."""
    img = torch.from_numpy(photos_rgb["t1"].copy())
    refined = FaceAligner(refine=True)
    d = refined.detect([img])[0]
    again = refine_landmarks(refined.mtcnn.onet, [img], [0] * len(d.scores), d.landmarks)
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
    """Every face of the five photos, under random similarity transforms + JPEG: the detected (raw MTCNN)
    landmarks follow the known transform about as well as MTCNN can, and the aligned crops agree.

    A trial = one face of the original photo that lies inside the transformed canvas (rotation ±30°, scale
    0.5–2×, JPEG q75–95); its error = mean distance of the five points to the transformed original landmarks,
    over the inter-ocular distance (a face not re-detected counts as infinite).

    What raw MTCNN reaches here (measured, seeds 2024/7/8/9/10): median error 5.8–7.1 % of the IOD, 64–78 % of
    trials within 10 %, 86–95 % within 20 %; median crop MAD 12 grey levels against the original's crop (the
    oracle crop, warped with the exactly transformed landmarks, 2.2). O-Net's landmarks move with the box
    quantisation, the pyramid level and the face's roll: that is the reference algorithm's own noise (an earlier
    5 %-on-95 % requirement was met only by tuning a refinement on these photos, which made held-out faces worse;
    README, "Accuracy"). The bounds below are those figures with a margin: they catch a broken detector, warp,
    landmark order or selection, not the reference's own scatter.
    """
    aligner = FaceAligner(min_face_rel=0.05)  # t1's faces are ~12 % of its shorter side: keep them all
    tmpl = arcface_template()
    rng = np.random.default_rng(2024)
    trials_per_photo = 10
    lm_err, crop_mad, oracle_mad = [], [], []
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
                    continue
                j = int(np.argmin(np.linalg.norm(l1.mean(1) - exp.mean(0), axis=1)))
                lm_err.append(np.linalg.norm(l1[j] - exp, axis=1).mean() / np.linalg.norm(exp[1] - exp[0]))
                # the detected crop and the oracle crop, against the original's
                Ms = estimate_similarity(torch.from_numpy(np.stack([l1[j], exp])), tmpl.double())
                crops = warp_faces([torch.from_numpy(canvas)], [0, 0], Ms, 112).numpy()
                mads = np.abs(crops.astype(int) - c0[k]).mean(axis=(1, 2, 3))
                crop_mad.append(mads[0])
                oracle_mad.append(mads[1])
    lm_err = np.array(lm_err)
    summary = (
        f"{len(lm_err)} face-trials: landmark error/IOD median {np.median(lm_err):.4f}, "
        f"≤10 %: {(lm_err <= 0.10).mean():.3f}, ≤20 %: {(lm_err <= 0.20).mean():.3f}; crop MAD median "
        f"{np.median(crop_mad):.1f} (oracle {np.median(oracle_mad):.1f})"
    )
    print(summary)
    assert len(lm_err) >= 30, summary
    assert np.median(lm_err) <= 0.08, summary
    assert (lm_err <= 0.10).mean() >= 0.60, summary
    assert (lm_err <= 0.20).mean() >= 0.85, summary
    assert np.median(crop_mad) <= 16 and np.median(oracle_mad) <= 4, summary


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


def test_other_detectors_report_why_they_found_nothing(photos_rgb):
    """detector="cascade": the face is aligned from O-Net's landmarks; a scene's cascade boxes that O-Net rejects
    are reported as such, never guessed into a crop."""
    res = FaceAligner(detector="cascade").align([photos_rgb["astronaut"], photos_rgb["coffee"], photos_rgb["rocket"]])
    assert res.found.tolist() == [True, False, False]
    assert res.miss_reason[1:] == ["no face: cascade box rejected by O-Net", "no face: no cascade box"]
    raw = FaceAligner().align([photos_rgb["astronaut"]])
    iod = float((raw.landmarks[0, 1] - raw.landmarks[0, 0]).norm())
    assert float((res.landmarks[0] - raw.landmarks[0]).norm(dim=1).mean()) < 0.05 * iod  # the same face
    with pytest.raises(UserError, match="unknown detector"):
        FaceAligner(detector="haar")
