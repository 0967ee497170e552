"""gpu_align.align.warp: ArcFace template, batched Umeyama fit against scikit-image, batched warp against OpenCV."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from gpu_align.align.warp import (
    ARCFACE_112,
    align_faces,
    arcface_template,
    center_crop_affine,
    estimate_similarity,
    invert_affine,
    transform_points,
    warp_faces,
)
from tests.photo_files import ARCFACE_DST_112  # InsightFace's arcface_dst, typed as literals

PHOTOS = ("astronaut", "camera", "t1", "tom_hanks", "messi")
CV2_FLOAT_WARP = tuple(int(v) for v in cv2.__version__.split(".")[:2]) >= (4, 11)  # float32 warp since 4.11


def _sim(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def _skimage_params(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from_estimate is the non-deprecated API in 0.26
        t = SimilarityTransform.from_estimate(src, dst)
    assert t, f"scikit-image failed: {t}"
    return t.params[:2]


def _diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99)), int(d.max())


# --- template -------------------------------------------------------------------------------------------------


def test_template_112_is_the_arcface_template():
    t = arcface_template(112)
    assert t.shape == (5, 2) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ARCFACE_DST_112, atol=1e-5)
    np.testing.assert_allclose(np.array(ARCFACE_112), ARCFACE_DST_112, atol=1e-5)  # the public constant too


@pytest.mark.parametrize(
    ("size", "ratio", "diff_x"),
    [(224, 2.0, 0.0), (336, 3.0, 0.0), (128, 1.0, 8.0), (256, 2.0, 16.0), (384, 3.0, 24.0)],
)
def test_template_variants(size, ratio, diff_x):
    """insightface's estimate_norm: ``dst = arcface_dst * ratio; dst[:, 0] += diff_x`` (ratio = size/112, diff_x = 0;
    or ratio = size/128, diff_x = 8·ratio), with its ratio and diff_x for each size written out by hand."""
    expected = ARCFACE_DST_112 * ratio
    expected[:, 0] += diff_x
    np.testing.assert_allclose(arcface_template(size).numpy(), expected, atol=1e-4)


def test_template_rejects_other_sizes_and_allows_explicit_base():
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        arcface_template(100)
    np.testing.assert_allclose(arcface_template(96, base=112).numpy(), ARCFACE_DST_112 * 96 / 112, atol=1e-4)


# --- similarity fit -------------------------------------------------------------------------------------------


def test_estimate_similarity_matches_skimage_on_random_inputs():
    rng = np.random.default_rng(0)
    B = 64
    src = rng.uniform(0, 1000, size=(B, 5, 2))
    # half: noisy similarity images of the template (the real use); half: unrelated random points, which
    # include Umeyama's reflection case (det of the covariance < 0)
    dst = rng.uniform(0, 112, size=(B, 5, 2))
    tmpl = np.array(ARCFACE_112)
    for b in range(B // 2):
        M = _sim(rng.uniform(0.05, 3), rng.uniform(-np.pi, np.pi), *rng.uniform(-500, 500, 2))
        src[b] = tmpl @ M[:, :2].T + M[:, 2] + rng.normal(0, 2, (5, 2))
        dst[b] = tmpl
    ref = np.stack([_skimage_params(src[b], dst[b]) for b in range(B)])
    ours64 = estimate_similarity(torch.tensor(src), torch.tensor(dst))
    assert ours64.shape == (B, 2, 3) and ours64.dtype == torch.float64
    np.testing.assert_allclose(ours64.numpy(), ref, atol=1e-9, rtol=0)
    # float32 in -> float32 out: within 1e-4, or float32's own resolution for translations in the thousands
    src32, dst32 = src.astype(np.float32), dst.astype(np.float32)
    ref32 = np.stack([_skimage_params(src32[b].astype(np.float64), dst32[b].astype(np.float64)) for b in range(B)])
    ours = estimate_similarity(torch.from_numpy(src32), torch.from_numpy(dst32))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref32, atol=1e-4, rtol=2e-7)
    # reflection cases were really exercised
    cov_det = [np.linalg.det((dst[b] - dst[b].mean(0)).T @ (src[b] - src[b].mean(0))) for b in range(B)]
    assert min(cov_det) < 0


def test_estimate_similarity_shared_dst_and_exact_recovery():
    rng = np.random.default_rng(1)
    tmpl = arcface_template(112)
    Ms = np.stack([_sim(rng.uniform(0.1, 5), rng.uniform(-3, 3), *rng.uniform(-300, 300, 2)) for _ in range(8)])
    # landmarks = inverse-similarity image of the template, so the fit must return exactly Ms
    Minv = invert_affine(torch.tensor(Ms))
    src = transform_points(Minv, tmpl.double().expand(8, 5, 2))
    M = estimate_similarity(src, tmpl)  # dst (N, 2) shared across the batch
    np.testing.assert_allclose(M.numpy(), Ms, atol=1e-6)
    # a single (N, 2) src gives a batch of one
    assert estimate_similarity(src[0], tmpl).shape == (1, 2, 3)


def test_estimate_similarity_degenerate_is_nan_and_warps_black():
    src = torch.full((1, 5, 2), 7.0)
    M = estimate_similarity(src, arcface_template())
    assert torch.isnan(M).all()
    img = torch.full((20, 20, 3), 200, dtype=torch.uint8)
    assert warp_faces([img], [0], M, 112).max() == 0


def test_invert_affine_closed_form():
    rng = np.random.default_rng(2)
    M = torch.tensor(rng.normal(size=(16, 2, 3)))
    Mi = invert_affine(M)
    full = torch.cat([M, torch.tensor([0.0, 0, 1]).expand(16, 1, 3)], 1)
    full_i = torch.cat([Mi, torch.tensor([0.0, 0, 1]).expand(16, 1, 3)], 1)
    np.testing.assert_allclose((full @ full_i).numpy(), np.broadcast_to(np.eye(3), (16, 3, 3)), atol=1e-9)


# --- warp against OpenCV --------------------------------------------------------------------------------------


def _random_transforms(rng, shapes, n, *, far_outside=False):
    """n random similarities: face centre anywhere in (or around) the image, any angle, 0.1-3x zoom."""
    Ms, idx = [], []
    for _ in range(n):
        i = int(rng.integers(len(shapes)))
        H, W = shapes[i]
        lo, hi = (-1.0, 2.0) if far_outside else (-0.2, 1.2)
        cx, cy = rng.uniform(lo * W, hi * W), rng.uniform(lo * H, hi * H)
        M = _sim(rng.uniform(0.1, 3.0), rng.uniform(-np.pi, np.pi), 0, 0)
        M[:, 2] = np.array([56.0, 56.0]) - M[:, :2] @ [cx, cy]
        Ms.append(M.astype(np.float32))
        idx.append(i)
    return np.stack(Ms), idx


def test_warp_matches_cv2_warpaffine_on_real_photos(photos_rgb):
    """Mixed-size real photos, one batched call, random transforms incl. ones reaching outside the image."""
    names = [n for n in PHOTOS if n in photos_rgb]
    imgs = [photos_rgb[n] for n in names]
    rng = np.random.default_rng(3)
    Ms, idx = _random_transforms(rng, [im.shape[:2] for im in imgs], 60)
    out = warp_faces([torch.from_numpy(im.copy()) for im in imgs], idx, torch.from_numpy(Ms), 112)
    assert out.shape == (60, 112, 112, 3) and out.dtype == torch.uint8
    ref = np.stack([cv2.warpAffine(imgs[i], Ms[k], (112, 112), borderValue=0) for k, i in enumerate(idx)])
    mad, p99, _ = _diff_stats(out.numpy(), ref)
    assert mad <= 0.5 and p99 <= 2, (mad, p99)
    if CV2_FLOAT_WARP:  # same float32 arithmetic as OpenCV >= 4.11: identical except rare rounding ties
        assert (out.numpy() != ref).mean() < 1e-3
        assert np.abs(out.numpy().astype(int) - ref).max() <= 1
    # the set really exercised the border: some crops are partly black because they reach outside
    assert any((ref[k] == 0).all(-1).mean() > 0.2 for k in range(60))


def test_warp_arcface_alignment_matches_cv2(photos_rgb):
    """The real use: similarity to the ArcFace template from plausible landmarks, several crop sizes."""
    img = photos_rgb["astronaut"]
    # astronaut's face, roughly: eyes ~(195,100) and ~(235,95), mouth ~(205,150)/(240,146) (image coordinates)
    lm = np.array([[[196.0, 101.0], [236.0, 96.0], [218.0, 125.0], [205.0, 151.0], [240.0, 146.0]]])
    for size in (112, 224, 128):
        crops, M = align_faces([torch.from_numpy(img.copy())], [0], torch.tensor(lm), size)
        ref = cv2.warpAffine(img, M[0].numpy(), (size, size), borderValue=0)
        mad, p99, _ = _diff_stats(crops[0].numpy(), ref)
        assert mad <= 0.5 and p99 <= 2
        # and the landmarks land on the template
        mapped = transform_points(M.double(), torch.tensor(lm))[0]
        assert (mapped - arcface_template(size).double()).norm(dim=1).max() < 0.05 * size


def test_warp_far_outside_and_bad_matrices_are_black(photos_rgb):
    img = torch.from_numpy(photos_rgb["astronaut"].copy())
    M = torch.tensor(
        [
            [[1.0, 0, -5000], [0, 1, -5000]],  # entirely outside (source region far right/below)
            [[1.0, 0, 5000], [0, 1, 5000]],  # entirely outside (left/above)
            [[float("nan"), 0, 0], [0, 1, 0]],  # NaN
            [[0.0, 0, 0], [0, 0, 0]],  # singular
            [[1e-9, 0, 0], [0, 1e-9, 0]],  # absurd zoom: every crop pixel from 1e9 px away
        ]
    )
    out = warp_faces([img], [0, 0, 0, 0, 0], M, 64)
    assert out.shape == (5, 64, 64, 3) and out.max() == 0
    # a half-outside crop: exactly cv2's black half and blended edge
    M2 = np.float32([[1, 0, 30], [0, 1, 0]])  # crop x < 30 lies left of the image
    out2 = warp_faces([img], [0], torch.from_numpy(M2[None]), 64)[0].numpy()
    ref2 = cv2.warpAffine(photos_rgb["astronaut"], M2, (64, 64), borderValue=0)
    assert (out2[:, :30] == 0).all() and np.array_equal(out2, ref2)
    # subpixel shift at the border: the edge column blends with black, as OpenCV's BORDER_CONSTANT does
    M3 = np.float32([[1, 0, 0.5], [0, 1, 0.5]])
    out3 = warp_faces([img], [0], torch.from_numpy(M3[None]), 32)[0].numpy()
    ref3 = cv2.warpAffine(photos_rgb["astronaut"], M3, (32, 32), borderValue=0)
    assert _diff_stats(out3, ref3)[2] <= 1 and 0 < out3[0, 5, 0] < photos_rgb["astronaut"][0, 5, 0]


def test_warp_mixed_batch_equals_separate_calls(photos_rgb):
    """Faces of different images in one call (shuffled order, repeats) equal warping them image by image."""
    imgs = [torch.from_numpy(photos_rgb[n].copy()) for n in ("t1", "astronaut", "tom_hanks")]
    rng = np.random.default_rng(4)
    Ms, idx = _random_transforms(rng, [im.shape[:2] for im in imgs], 24)
    together = warp_faces(imgs, idx, torch.from_numpy(Ms), 112)
    # small chunks exercise the chunk loop
    chunked = warp_faces(imgs, idx, torch.from_numpy(Ms), 112, max_samples_per_chunk=3 * 112 * 112)
    assert torch.equal(together, chunked)
    for i in range(3):
        sel = [k for k, j in enumerate(idx) if j == i]
        alone = warp_faces([imgs[i]], [0] * len(sel), torch.from_numpy(Ms[sel]), 112)
        assert torch.equal(together[sel], alone)
    # a (B, H, W, C) tensor works too
    same = torch.stack([imgs[1], imgs[1]])
    assert torch.equal(warp_faces(same, [1], torch.from_numpy(Ms[:1]), 112), warp_faces([imgs[1]], [0], Ms[:1], 112))


@pytest.mark.parametrize("channels", [1, 4])
def test_warp_other_channel_counts(photos_rgb, channels):
    rgb = photos_rgb["astronaut"]
    img = rgb[..., :1] if channels == 1 else np.dstack([rgb, rgb[..., :1]])
    img = np.ascontiguousarray(img)
    M = np.float32([[0.4, -0.1, 10], [0.1, 0.4, -20]])
    out = warp_faces([torch.from_numpy(img)], [0], torch.from_numpy(M[None]), 112)[0].numpy()
    ref = cv2.warpAffine(img, M, (112, 112), borderValue=0).reshape(112, 112, channels)
    assert out.shape == (112, 112, channels) and _diff_stats(out, ref)[0] <= 0.5


def test_warp_no_faces_and_input_errors(photos_rgb):
    img = torch.from_numpy(photos_rgb["astronaut"].copy())
    assert warp_faces([img], torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3), 112).shape == (0, 112, 112, 3)
    with pytest.raises(ValueError, match="uint8"):
        warp_faces([img.float()], [0], torch.zeros(1, 2, 3), 112)
    with pytest.raises(ValueError, match=r"\(F, 2, 3\)"):
        warp_faces([img], [0], torch.zeros(1, 3, 3), 112)
    with pytest.raises(ValueError, match="entries"):
        warp_faces([img], [0, 0], torch.zeros(1, 2, 3), 112)
    with pytest.raises(ValueError, match="out of range"):
        warp_faces([img], [1], torch.zeros(1, 2, 3), 112)


def test_center_crop_affine_matches_insightface_fallback(photos_rgb):
    """The no-face fallback of InsightFace's face_preprocess (inset 6.25 %, margin 44, cv2.resize)."""
    for name in ("t1", "astronaut", "messi"):
        if name not in photos_rgb:
            continue
        img = photos_rgb[name]
        H, W = img.shape[:2]
        # the reference, written out as face_preprocess does it
        det = [int(W * 0.0625), int(H * 0.0625), W - int(W * 0.0625), H - int(H * 0.0625)]
        bb = [max(det[0] - 22, 0), max(det[1] - 22, 0), min(det[2] + 22, W), min(det[3] + 22, H)]
        ref = cv2.resize(img[bb[1] : bb[3], bb[0] : bb[2]], (112, 112))
        M = center_crop_affine([H], [W], 112)
        out = warp_faces([torch.from_numpy(img.copy())], [0], M, 112)[0].numpy()
        mad, p99, _ = _diff_stats(out, ref)
        # cv2.resize uses 11-bit fixed-point weights, hence not bit-exact
        assert mad <= 0.5 and p99 <= 2, (name, mad, p99)


@pytest.mark.cuda
def test_warp_cuda_matches_cpu(photos_rgb):
    imgs = [torch.from_numpy(photos_rgb[n].copy()) for n in ("t1", "astronaut", "camera")]
    rng = np.random.default_rng(5)
    Ms, idx = _random_transforms(rng, [im.shape[:2] for im in imgs], 40, far_outside=True)
    cpu = warp_faces(imgs, idx, torch.from_numpy(Ms), 112)
    gpu = warp_faces([im.cuda() for im in imgs], torch.tensor(idx).cuda(), torch.from_numpy(Ms).cuda(), 112)
    assert gpu.device.type == "cuda"
    d = (gpu.cpu().int() - cpu.int()).abs()
    assert d.float().mean() < 0.01 and d.max() <= 1  # FMA contraction may flip rare rounding ties
    M = estimate_similarity(torch.rand(7, 5, 2, device="cuda") * 100, arcface_template(device="cuda"))
    assert M.device.type == "cuda" and M.shape == (7, 2, 3)
