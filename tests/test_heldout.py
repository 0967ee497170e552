"""benchmarks/heldout.py's pure parts, without the download: landmark files, 68 -> 5, exact view transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import heldout


def _synthetic_68(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 500, size=(68, 2))


def test_reduce_68_to_5_takes_the_ibug_means_and_points():
    p = _synthetic_68(np.random.default_rng(1))
    # put the eyes where their means are known exactly
    p[36:42] = np.array([10, 20]) + np.array([[-3, 0], [3, 0], [0, -2], [0, 2], [1, 1], [-1, -1]])
    p[42:48] = np.array([60, 22]) + np.array([[-5, 0], [5, 0], [0, -4], [0, 4], [2, 2], [-2, -2]])
    five = heldout.reduce_68_to_5(p)
    np.testing.assert_allclose(five[0], [10, 20])
    np.testing.assert_allclose(five[1], [60, 22])
    np.testing.assert_array_equal(five[2], p[30])
    np.testing.assert_array_equal(five[3], p[48])
    np.testing.assert_array_equal(five[4], p[54])
    with pytest.raises(ValueError):
        heldout.reduce_68_to_5(p[:67])


def test_parse_pts_is_one_based_and_ljson_is_y_x():
    pts = "version: 1\nn_points:  3\n{\n1 1\n10.5 20.25\n3 4\n}\n"
    np.testing.assert_allclose(heldout.parse_pts(pts), [[0, 0], [9.5, 19.25], [2, 3]])
    with pytest.raises(ValueError):
        heldout.parse_pts("version: 1\nn_points: 4\n{\n1 1\n2 2\n}\n")
    lj = {"version": 3, "groups": {"LJSON": {"landmarks": {"points": [[20.0, 10.0], [None, None]]}}}}
    out = heldout.parse_ljson(json.dumps(lj))
    np.testing.assert_allclose(out[0], [10, 20])
    assert np.isnan(out[1]).all()


def test_nme_normalises_by_the_ground_truth_inter_ocular_distance():
    gt = np.array([[0, 0], [100, 0], [50, 40], [20, 80], [80, 80]], dtype=float)
    pred = gt + np.array([[3, 4], [0, 0], [0, 10], [0, 0], [-6, 8]])  # errors 5, 0, 10, 0, 10 px
    np.testing.assert_allclose(heldout.point_errors(pred, gt), [0.05, 0, 0.1, 0, 0.1])
    assert heldout.nme(pred, gt) == pytest.approx(0.05)


def _dot_image(h: int, w: int, centre: tuple[float, float], sigma: float = 2.5) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    g = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat((255 * g).round().astype(np.uint8)[..., None], 3, axis=2)


def _centroid(img: np.ndarray) -> np.ndarray:
    v = img[..., 0].astype(np.float64)
    v[v < 0.2 * v.max()] = 0  # ignore JPEG ringing far from the dot
    y, x = np.mgrid[0 : v.shape[0], 0 : v.shape[1]]
    return np.array([(x * v).sum(), (y * v).sum()]) / v.sum()


@pytest.mark.parametrize(
    ("angle", "scale", "flip", "quality"),
    [(0.0, 1.0, False, None), (23.0, 0.55, False, None), (-17.0, 1.7, True, None), (11.0, 1.3, True, 90)],
)
def test_view_maps_points_exactly(angle, scale, flip, quality):
    # a Gaussian dot at a sub-pixel spot: after the view it must sit where the transformed point says
    spot = (61.3, 37.8)
    img = _dot_image(90, 120, spot, sigma=4.0 / min(scale, 1.0))  # wide enough to survive the area shrink
    pts = np.array([spot, [0.0, 0.0], [119.0, 89.0]])
    out, moved = heldout.make_view(img, pts, angle=angle, scale=scale, flip=flip, quality=quality)
    found = _centroid(out)
    assert np.linalg.norm(found - moved[0]) < 0.15, (found, moved[0])
    # the whole image stays on the canvas: its corner pixels land inside it
    h, w = out.shape[:2]
    assert (moved[1:] >= -0.5).all()
    assert (moved[1:, 0] <= w - 0.5).all() and (moved[1:, 1] <= h - 0.5).all()


def test_mirrored_view_relabels_left_and_right():
    # a synthetic upright "face" crop: after a mirror the ground truth's eyeL must still be the image-left point
    face = heldout.Face("synthetic", np.zeros((200, 200, 3), np.uint8), np.zeros((68, 2)))
    face.points68[:] = [100, 100]
    face.points68[0], face.points68[16] = [40, 60], [160, 60]  # the jaw sets the loose box
    face.points68[36:42], face.points68[42:48] = [70, 80], [130, 80]
    face.points68[48], face.points68[54] = [80, 140], [120, 140]
    views = heldout.make_views([face], 40, seed=3, max_angle=0.0, qualities=(95, 95))
    assert {v.flipped for v in views} == {True, False}
    for v in views:
        assert v.points[0, 0] < v.points[1, 0] and v.points[3, 0] < v.points[4, 0]
        iod = np.linalg.norm(v.points[1] - v.points[0])
        assert iod == pytest.approx(60 * v.image.shape[1] / face_crop_width(face), rel=0.03)


def face_crop_width(face: heldout.Face) -> int:
    return heldout.loose_crop(face.image, face.points68)[0].shape[1]


def test_views_are_seeded_and_do_not_depend_on_the_count():
    face = heldout.Face("synthetic", np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8),
                        np.random.default_rng(1).uniform(30, 70, (68, 2)))  # fmt: skip
    a = heldout.make_views([face], 3, seed=5)
    b = heldout.make_views([face], 5, seed=5)
    c = heldout.make_views([face], 3, seed=6)
    for x, y in zip(a, b[:3], strict=True):
        assert x.angle == y.angle and x.scale == y.scale and x.quality == y.quality
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.points, y.points)
    assert [v.angle for v in a] != [v.angle for v in c]
    assert all(-25 <= v.angle <= 25 and 0.5 <= v.scale <= 1.8 and 75 <= v.quality <= 95 for v in b)
