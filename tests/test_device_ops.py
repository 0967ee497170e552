"""The CUDA code paths, run on CPU (``tuning="cuda"``): same results as the CPU paths, and a bounded device-op budget.

A GPU runs branches that the CPU path never takes (torch summed-area tables, one-gather pyramid resampling, the
warp's whole-batch gather); ``MTCNN(tuning="cuda")`` / ``FaceAligner(tuning="cuda")`` force them here, so these
tests check on every CI run what the GPU must keep: bit-identical tables, detections and crops, host syncs per
``align()`` that do not grow with the batch, and few device ops per photo (``benchmarks/bench_launches.py``).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from benchmarks.bench_launches import make_photos, measure
from gpu_align import FaceAligner
from gpu_align.align.warp import warp_faces
from gpu_align.detect.mtcnn import CUDA_TUNING, MTCNN, MTCNNWeightsMissing, mtcnn_weights_dir
from gpu_align.detect.mtcnn.resample import integral_images

try:
    mtcnn_weights_dir()
except MTCNNWeightsMissing as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def small_photos():
    return make_photos(24, 120, 320, seed=5)


def test_tuning_switch_selects_cuda_work_sizes_and_paths():
    m = MTCNN(tuning="cuda")
    assert m.device.type == "cpu" and m.cuda_paths and m.tuning == CUDA_TUNING
    assert not MTCNN().cuda_paths
    with pytest.raises(ValueError, match="tuning"):
        MTCNN(tuning="tpu")


@pytest.mark.parametrize("max_pixels", [1 << 24, 5000, 1])
def test_batched_torch_scan_equals_numpy_tables_exactly(load_photo, max_pixels):
    # Odd sizes, 1-pixel and 1-row images, a saturated image (largest sums), real photos; several scan steps.
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(1, 1), (7, 3), (1, 90)]]
    images += [torch.full((301, 257, 3), 255, dtype=torch.uint8), torch.from_numpy(load_photo("astronaut").copy())]
    images.append(torch.from_numpy(load_photo("camera").copy()))
    cpu = integral_images(images, torch_scan=False)
    cuda = integral_images(images, torch_scan=True, max_pixels=max_pixels)
    assert cpu.flat.dtype == cuda.flat.dtype == torch.int32
    assert torch.equal(cpu.flat, cuda.flat)
    for b, im in enumerate(images):
        t = cuda.table(b)
        assert int(t[0].abs().sum()) == int(t[:, 0].abs().sum()) == 0
        assert torch.equal(t[-1, -1].long(), im.long().sum(dim=(0, 1)))
    for name in ("base", "stride", "height", "width"):
        assert torch.equal(getattr(cpu, name), getattr(cuda, name))


def test_cuda_paths_detect_exactly_like_cpu_paths(small_photos, load_photo):
    batch = [*small_photos, torch.from_numpy(load_photo("t1").copy())]
    want = MTCNN().detect(batch)
    got = MTCNN(tuning="cuda").detect(batch)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)


def _per_face_reference(img: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@pytest.mark.parametrize("channels", [3, 1, 4])
def test_warp_whole_batch_gather_equals_per_face_crops_and_opencv(channels):
    rng = np.random.default_rng(channels)
    sizes = [(40, 60), (300, 200), (5, 7), (128, 96)]
    imgs = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in sizes]
    n = 120
    idx = rng.integers(0, len(imgs), n)
    Ms = []
    for f in range(n):  # any scale, roll and position, partly or wholly outside the image
        s, a = rng.uniform(0.1, 4), rng.uniform(-np.pi, np.pi)
        h, w = imgs[idx[f]].shape[:2]
        cx, cy = rng.uniform(-0.5 * w, 1.5 * w), rng.uniform(-0.5 * h, 1.5 * h)
        c, si = s * np.cos(a), s * np.sin(a)
        Ms.append([[c, -si, 56 - (c * cx - si * cy)], [si, c, 56 - (si * cx + c * cy)]])
    Ms = np.array(Ms, dtype=np.float32)
    Ms[3] = np.nan  # black crops
    tensors = [torch.from_numpy(im) for im in imgs]
    crops_cpu = warp_faces(tensors, idx.tolist(), torch.from_numpy(Ms), 112)
    for chunk in (None, 3 * 112 * 112):
        crops_cuda = warp_faces(tensors, torch.from_numpy(idx), torch.from_numpy(Ms), 112, tuning="cuda",
                                max_samples_per_chunk=chunk)  # fmt: skip
        assert torch.equal(crops_cpu, crops_cuda)
    assert int(crops_cpu[3].max()) == 0
    # independent reference: OpenCV per face (float32 warp since 4.11; ties may round differently: a few pixels ±1)
    if tuple(int(v) for v in cv2.__version__.split(".")[:2]) >= (4, 11):
        for f in range(n):
            if f == 3:
                continue
            want = _per_face_reference(imgs[idx[f]], Ms[f].astype(np.float64), 112).reshape(112, 112, channels)
            d = np.abs(crops_cpu[f].numpy().astype(np.int16) - want.astype(np.int16))
            assert d.max() <= 1 and (d > 0).mean() < 0.01, f


def test_aligner_cuda_paths_give_identical_crops(small_photos):
    want = FaceAligner().align(small_photos)
    got = FaceAligner(tuning="cuda").align(small_photos)
    assert int(want.found.sum()) >= len(small_photos) - 4
    for name in ("crops", "found", "boxes", "landmarks", "scores", "transforms"):  # exact (NaN where no face)
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True)


def test_host_syncs_do_not_grow_with_the_batch_and_ops_per_photo_stay_small(small_photos):
    aligner = FaceAligner(tuning="cuda")
    aligner.align(small_photos[:4])
    small = measure(aligner, small_photos[:8])
    large = measure(aligner, small_photos)
    syncs = (sum(small["syncs"].values()), sum(large["syncs"].values()))
    copies = (sum(small["h2d"].values()), sum(large["h2d"].values()))
    # NMS convergence checks are the only data-dependent count: allow one more check per NMS call (4 calls)
    assert abs(syncs[1] - syncs[0]) <= 4, (small["syncs"], large["syncs"])
    assert syncs[1] <= 45 and copies[1] <= 12, (large["syncs"], large["h2d"])
    ops_per_photo = sum(large["ops"].values()) / len(small_photos)
    assert ops_per_photo < 60, large["ops"].most_common(10)  # ~7 per photo at batch 256 (bench_launches)


def test_dali_schedules_the_next_batch_before_handing_out_the_current_one(tmp_path, load_photo):
    from gpu_align.decode import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI not installed")
    from gpu_align.decode.dali import DaliDecoder

    events = []

    class Logged(DaliDecoder):
        def _start(self, items):
            events.append(("start", items[0].index))
            return super()._start(items)

        def _collect(self, items, started):
            events.append(("collect", items[0].index))
            return super()._collect(items, started)

    img = load_photo("astronaut")
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), np.ascontiguousarray(img[i : i + 200, i : i + 180, ::-1]))
    with Logged(device="cpu", threads=2, batch_size=4) as dec:
        assert dec.overlap and dec.reader_threads == 16
        for batch in dec.batches(enumerate(paths)):
            events.append(("yield", batch.indices[0]))
            assert len(batch.indices) == 4 and not batch.failures
    # batch N+1 is scheduled after N's outputs are collected and before N is handed out
    assert events == [("start", 0), ("collect", 0), ("start", 4), ("yield", 0), ("collect", 4), ("start", 8),
                      ("yield", 4), ("collect", 8), ("yield", 8)]  # fmt: skip
