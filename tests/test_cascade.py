"""``--detector cascade`` (gpu_align.detect.cascade) and MTCNN.onet_on_boxes, on the real shipped photos.

Landmark bounds are measured against MTCNN's own landmarks on the same photos (its min-face rule:
``max(20, 0.1 · shorter side)``), in % of MTCNN's inter-ocular distance, and asserted with a margin.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gpu_align.detect import make_detector
from gpu_align.detect.base import Detections
from gpu_align.detect.cascade import MISS_NO_CASCADE_BOX, MISS_ONET_REJECTED, CascadeDetector
from gpu_align.detect.mtcnn import MTCNN
from gpu_align.detect.mtcnn.pyramid import plan_pyramid
from gpu_align.detect.mtcnn.resample import integral_images
from packer.errors import UserError

FACES = {"astronaut": 1, "camera": 1, "t1": 6, "tom_hanks": 1, "messi": 1}
# Measured (scale_factor 1.2, step 1, 2 neighbours, box ×1.2, one refinement pass): per face ≤ 8.0 %, mean 4.7 %.
MAX_LANDMARK_ERROR = 12.0
MEAN_LANDMARK_ERROR = 6.5


def _min_face(image: np.ndarray) -> float:
    return max(20.0, 0.1 * min(image.shape[0], image.shape[1]))


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _confident(d: Detections, floor: float) -> Detections:
    keep = d.scores > floor
    return Detections(d.boxes[keep], d.scores[keep], d.landmarks[keep])


@pytest.fixture(scope="module")
def detector() -> CascadeDetector:
    return CascadeDetector(threads=2)


@pytest.fixture(scope="module")
def found(detector, photos_rgb) -> dict[str, tuple[Detections, int, str | None]]:
    """One-image calls: detections, cascade box count, miss reason."""
    out = {}
    for name, im in photos_rgb.items():
        d = detector.detect([im], min_face_sizes=[_min_face(im)])[0]
        out[name] = (d, detector.last_box_counts[0], detector.last_miss_reasons[0])
    return out


@pytest.fixture(scope="module")
def reference(detector, photos_rgb) -> dict[str, Detections]:
    """MTCNN's confident faces (the same O-Net weights, via the cascade detector's MTCNN)."""
    m = detector.mtcnn
    return {
        n: _confident(m.detect([im], min_face_sizes=[_min_face(im)])[0], MTCNN.score_floor)
        for n, im in photos_rgb.items()
    }


@pytest.fixture(scope="module")
def rnet_output(detector, photos_rgb):
    """MTCNN's R-Net boxes (the O-Net inputs of ``detect``) for photos of different sizes."""
    m = detector.mtcnn
    ims = [photos_rgb[n] for n in ("astronaut", "t1", "tom_hanks", "camera")]
    tensors = [torch.from_numpy(im.copy()) for im in ims]
    ii = integral_images(tensors)
    plan = plan_pyramid([t.shape[:2] for t in tensors], [20.0] * len(ims), m.scale_factor, page_side=512)
    boxes, index = m._stage1(ii, plan, m.tuning)
    boxes, index = m._stage2(ii, boxes, index, m.tuning)
    return ims, boxes, index, m.detect(ims)


class TestOnetOnBoxes:
    """MTCNN.onet_on_boxes: O-Net on boxes from outside."""

    def test_rnet_boxes_give_mtcnn_detect_exactly(self, detector, rnet_output):
        ims, boxes, index, expected = rnet_output
        got = detector.mtcnn.onet_on_boxes(ims, boxes, index, square=False)
        assert [g.boxes.shape[0] for g in got] == [e.boxes.shape[0] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g.boxes, e.boxes) and torch.equal(g.scores, e.scores)
            assert torch.equal(g.landmarks, e.landmarks)

    def test_squaring_square_boxes_changes_only_rounding(self, detector, rnet_output):
        ims, boxes, index, expected = rnet_output
        got = detector.mtcnn.onet_on_boxes(ims, boxes, index)  # square=True: rerec of square boxes, ~1 ulp
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.boxes, e.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(g.landmarks, e.landmarks, atol=1e-3, rtol=0)

    def test_a_box_on_a_non_face_is_rejected(self, detector, photos_rgb):
        coffee = photos_rgb["coffee"]
        d = detector.mtcnn.onet_on_boxes([coffee], torch.tensor([[200.0, 100.0, 300.0, 200.0]]), torch.tensor([0]))
        assert d[0].boxes.shape == (0, 4) and d[0].landmarks.shape == (0, 5, 2)

    def test_no_boxes_and_boxes_outside_give_empty_detections(self, detector, photos_rgb):
        ims = [photos_rgb["astronaut"], photos_rgb["coffee"]]
        empty = detector.mtcnn.onet_on_boxes(ims, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64))
        outside = detector.mtcnn.onet_on_boxes(ims, torch.tensor([[900.0, 900.0, 950.0, 950.0]]), torch.tensor([1]))
        for d in (*empty, *outside):
            assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.landmarks.shape == (0, 5, 2)

    def test_bad_arguments_raise(self, detector, photos_rgb):
        with pytest.raises(ValueError, match="2 boxes but 1 image indices"):
            detector.mtcnn.onet_on_boxes([photos_rgb["astronaut"]], torch.zeros((2, 4)), torch.tensor([0]))
        with pytest.raises(ValueError, match="out of range"):
            detector.mtcnn.onet_on_boxes([photos_rgb["astronaut"]], torch.zeros((1, 4)), torch.tensor([1]))


class TestFacesFound:
    """Every face MTCNN finds on the shipped photos, with landmarks close to MTCNN's."""

    @pytest.mark.parametrize("name", sorted(FACES))
    def test_face_photo(self, name, found, reference, photos_rgb):
        if name not in photos_rgb:
            pytest.skip(f"{name} not installed")
        d, _, reason = found[name]
        d = _confident(d, CascadeDetector.score_floor)
        ref = reference[name]
        assert ref.boxes.shape[0] == FACES[name]
        assert reason is None
        assert d.boxes.shape[0] == FACES[name], d.scores
        match = _iou(ref.boxes, d.boxes)
        assert (match.max(dim=1).values > 0.5).all()
        j = match.argmax(dim=1)
        iod = (ref.landmarks[:, 1] - ref.landmarks[:, 0]).norm(dim=1)
        error = (d.landmarks[j] - ref.landmarks).norm(dim=2).mean(dim=1) / iod * 100
        assert error.max() < MAX_LANDMARK_ERROR, error

    def test_mean_landmark_error(self, found, reference):
        errors = []
        for name in FACES:
            if name not in found:
                continue
            d, ref = _confident(found[name][0], CascadeDetector.score_floor), reference[name]
            j = _iou(ref.boxes, d.boxes).argmax(dim=1)
            iod = (ref.landmarks[:, 1] - ref.landmarks[:, 0]).norm(dim=1)
            errors.append((d.landmarks[j] - ref.landmarks).norm(dim=2).mean(dim=1) / iod * 100)
        assert torch.cat(errors).mean() < MEAN_LANDMARK_ERROR

    def test_outputs_are_float32_sorted_on_device(self, detector, found):
        d = found["t1"][0]
        for t in d:
            assert t.dtype == torch.float32 and t.device == detector.device
        assert torch.equal(d.scores, d.scores.sort(descending=True).values)


class TestNonFaceScenes:
    """Scenes without faces: cascade boxes there (measured: coffee 1, chelsea 2) are rejected by O-Net."""

    @pytest.mark.parametrize(
        ("name", "reason"),
        [("coffee", MISS_ONET_REJECTED), ("chelsea", MISS_ONET_REJECTED), ("rocket", MISS_NO_CASCADE_BOX)],
    )
    def test_no_face_and_why(self, name, reason, found):
        d, boxes, why = found[name]
        assert d.boxes.shape == (0, 4)
        assert why == reason
        assert (boxes > 0) == (reason == MISS_ONET_REJECTED)


class TestTinyImage:
    def test_smaller_than_the_window_gives_no_face(self, detector, photos_rgb):
        tiny = photos_rgb["tiny"]
        d = detector.detect([tiny])[0]
        assert d.boxes.shape == (0, 4) and d.landmarks.shape == (0, 5, 2)
        assert detector.last_miss_reasons == [MISS_NO_CASCADE_BOX]


class TestBatch:
    def test_mixed_sizes_equal_one_at_a_time(self, detector, photos_rgb, found):
        names = ["astronaut", "tiny", "t1", "coffee", "tom_hanks"]
        ims = [photos_rgb[n] for n in names]
        batch = detector.detect(ims, min_face_sizes=[_min_face(im) for im in ims])
        for name, got in zip(names, batch, strict=True):
            one = found[name][0]
            torch.testing.assert_close(got.boxes, one.boxes, atol=1e-4, rtol=0)
            torch.testing.assert_close(got.scores, one.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.landmarks, one.landmarks, atol=1e-4, rtol=0)
        assert detector.last_box_counts == [found[n][1] for n in names]
        assert detector.last_miss_reasons == [found[n][2] for n in names]

    def test_torch_input_and_empty_batch(self, detector, photos_rgb, found):
        d = detector.detect([torch.from_numpy(photos_rgb["tom_hanks"].copy())], min_face_sizes=[20.0])[0]
        torch.testing.assert_close(d.landmarks, found["tom_hanks"][0].landmarks, atol=1e-4, rtol=0)
        assert detector.detect([], min_face_sizes=[]) == []


class TestDownscale:
    """The cascade scans a copy downscaled so the smallest wanted face maps to its 24 px window."""

    def test_large_photo_is_downscaled(self, detector, photos_rgb):
        gray, s = detector._scan_image(torch.from_numpy(photos_rgb["astronaut"].copy()), 51.2)
        assert s == pytest.approx(24 * 1.2 / 51.2) and gray.shape == (288, 288) and gray.dtype == np.float32

    def test_small_faces_are_never_upscaled(self, detector, photos_rgb):
        gray, s = detector._scan_image(torch.from_numpy(photos_rgb["tom_hanks"].copy()), 20.0)
        assert s == 1.0 and gray.shape == (112, 112)


class TestInterface:
    def test_make_detector_builds_it(self):
        det = make_detector("cascade", device="cpu", dtype=torch.float32, channels_last=None)
        assert isinstance(det, CascadeDetector)
        assert det.name == "cascade" and det.score_floor == MTCNN.score_floor
        assert det.device == torch.device("cpu")

    def test_missing_scikit_image_says_how_to_install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "skimage.feature", None)  # makes the import fail
        with pytest.raises(UserError, match="pip install scikit-image"):
            CascadeDetector()

    def test_bad_options_raise(self):
        with pytest.raises(ValueError, match="min_size"):
            CascadeDetector(min_size=12)
        with pytest.raises(ValueError, match="scale_factor"):
            CascadeDetector(scale_factor=1.0)
