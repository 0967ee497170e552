"""MTCNN face detection (P-Net → R-Net → O-Net) in pure torch, batched across images of different sizes.

Reproduces facenet-pytorch 2.6.0's ``detect_face`` (its weights, defaults, box regression, ``rerec``, ``pad``, the
(N, W, H, C) flatten of R-Net/O-Net, landmark decoding, the rounding and ``+1`` conventions) with these changes
of *implementation* (same results):

- Pyramid: all levels of all images are packed into a few atlas pages (:mod:`.pyramid`) and P-Net runs
  once per page batch; masks keep images apart, so each image gets exactly its lone-image outputs.
- Resampling (pyramid levels and the 24×24 / 48×48 crops) reads summed-area tables (:mod:`.resample`):
  all crops in one gather, all pyramid levels in one gather (CUDA) or a few ops per level (CPU). Bit-identical to
  facenet-pytorch's per-box ``interpolate(mode="area")`` of the same region.
- NMS: exact greedy NMS in torch on the device, batched over images/levels (``gpu_align.detect.nms``).

and these deliberate deviations:

- A candidate box whose clipped crop is empty is dropped (facenet-pytorch skips its crop but keeps the box, which
  misaligns boxes and crops for the rest of the batch).
- Images whose short side is below the minimum face size (no pyramid level; e.g. scikit-image's 14×25
  ``no_time_for_that_tiny.gif`` at the default 20 px) give no detections instead of an exception.
- Box arithmetic is always float32, also when the networks run in float16; O-Net (landmarks) stays float32 unless
  ``onet_dtype`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gpu_align.detect.base import Detections, as_image_tensor
from gpu_align.detect.mtcnn.pyramid import PyramidPlan, plan_pyramid
from gpu_align.detect.mtcnn.resample import (
    IntegralImages,
    integral_images,
    resample_crops,
    resample_levels_into,
    resample_ragged_into,
)
from gpu_align.detect.nms import batched_nms
from gpu_align.device import TUNINGS, cuda_paths, host_to_device
from gpu_align.errors import DetectorError

INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"
_WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
# conv1 outputs outside an image: loses every max-pool comparison, still finite in float16.
_OUTSIDE = -1.0e4


class MTCNNWeightsMissing(DetectorError, FileNotFoundError):
    """The MTCNN weight files are not installed; the message says how to install them."""


def mtcnn_weights_dir() -> Path:
    """``facenet_pytorch/data`` of the installed facenet-pytorch wheel, found without importing the package.

    (Importing facenet_pytorch needs torchvision, which this project does not use.) Raises
    :class:`MTCNNWeightsMissing` with the install command when the package or a weight file is missing.
    """
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MTCNNWeightsMissing(f"MTCNN weights not found: facenet-pytorch is not installed; run: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if all((data / name).is_file() for name in _WEIGHT_FILES):
            return data
    raise MTCNNWeightsMissing(
        f"MTCNN weights ({', '.join(_WEIGHT_FILES)}) missing from facenet-pytorch; reinstall: {INSTALL_HINT}"
    )


# --- networks (parameter names match facenet-pytorch's state dicts) --------------------------------------------


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12×12 receptive field, output stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def _head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised → regression (N, 4, h, w), face probability (N, h, w)."""
        return self._head(self.pool1(self.prelu1(self.conv1(x))))

    def forward_atlas(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P-Net over atlas pages holding many images (see ``gpu_align.detect.mtcnn.pyramid``).

        Args:
            x: (P, 3, H, W) normalised pages.
            ids: (P, H, W) int32 placement id of every page pixel, -1 where no image is.
        Returns:
            regression (P, 4, h, w), face probability (P, h, w), and the placement id of each output cell
            (P, h, w) int64, -1 where the cell's 12×12 window is not inside one placement.
        """
        # conv1 cell valid iff its 3×3 window lies in one placement (rectangles: check two opposite corners).
        id1 = ids[:, :-2, :-2]
        valid1 = (id1 >= 0) & (id1 == ids[:, 2:, 2:])
        y = self.prelu1(self.conv1(x))
        y = self.pool1(torch.where(valid1[:, None], y, _OUTSIDE))  # a Python scalar: no host→device copy
        # A pooled cell is valid iff the top-left conv1 cell of its window is (the pool is ceil-mode).
        valid2 = valid1[:, ::2, ::2]
        id2 = id1[:, ::2, ::2]
        y = torch.where(valid2[:, None], y, 0.0)
        reg, prob = self._head(y)
        # Output cell (i, j) reads pooled cells [i, i+5) × [j, j+5): valid iff both corners are valid, same placement.
        cell = id2[:, :-4, :-4]
        ok = valid2[:, :-4, :-4] & valid2[:, 4:, 4:] & (cell == id2[:, 4:, 4:])
        return reg, prob, torch.where(ok, cell, -1).long()


class RNet(nn.Module):
    """Refinement network on 24×24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 24, 24) normalised → regression (N, 4), face probability (N,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The Caffe-trained dense layer expects (N, W, H, C) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output network on 48×48 crops: box regression, 5 landmarks, face probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, 48, 48) normalised → regression (N, 4), landmarks (N, 10) (x1..x5, y1..y5 in [0, 1] of the
        box), face probability (N,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


# --- box helpers (float32, facenet-pytorch's exact formulas) ----------------------------------------------------


def _rerec(b: torch.Tensor) -> torch.Tensor:
    """Square boxes (N, 4) around their centres, side = max(w, h) (no +1), as facenet-pytorch's ``rerec``."""
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    side = torch.maximum(w, h)
    x1 = b[:, 0] + w * 0.5 - side * 0.5
    y1 = b[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _bbreg(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply R-Net/O-Net regression (N, 4) with +1 box sizes, as facenet-pytorch's ``bbreg``."""
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    return torch.stack(
        [b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h, b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h], dim=1
    )


def _crop_regions(boxes: torch.Tensor, image_index: torch.Tensor, ii: IntegralImages):
    """facenet-pytorch's ``pad``: truncate, clip to the image, crop rows [y-1, ey), cols [x-1, ex) (1-based).

    Returns (y0, x0, h, w) (N,) int64 and the (N,) bool mask of non-empty regions.
    """
    t = boxes.trunc().long()
    img_h = ii.height[image_index]
    img_w = ii.width[image_index]
    x0 = t[:, 0].clamp(min=1) - 1
    y0 = t[:, 1].clamp(min=1) - 1
    x1 = torch.minimum(t[:, 2], img_w)
    y1 = torch.minimum(t[:, 3], img_h)
    h = y1 - y0
    w = x1 - x0
    return y0, x0, h, w, (h > 0) & (w > 0)


@dataclass(frozen=True)
class Tuning:
    """Work sizes: they change speed and memory, never results."""

    page_side: int  # atlas page side (px) for P-Net; larger pyramid levels get a page of their own
    pnet_max_pixels: int  # atlas pixels per P-Net call
    crop_batch: int  # R-Net crops per forward pass (O-Net: a quarter, its crops have 4× the pixels)
    resample_chunk: int  # output pixels per step of the one-gather pyramid resampling
    pyramid_resample: str  # "levels" (one region at a time) or "flat" (one gather for all); same values


# CPU: pieces that stay in cache (measured, 1 thread: P-Net on 512² pages ~3× faster per pixel than on 2048²
# pages; R-Net/O-Net ~3× faster per crop in batches of 64 than of 256).
CPU_TUNING = Tuning(
    page_side=512, pnet_max_pixels=512 * 512, crop_batch=64, resample_chunk=1 << 16, pyramid_resample="levels"
)
# CUDA: few, large launches (memory: ~100 bytes per atlas pixel in float32).
CUDA_TUNING = Tuning(
    page_side=2048, pnet_max_pixels=1 << 24, crop_batch=8192, resample_chunk=1 << 24, pyramid_resample="flat"
)


class MTCNN(nn.Module):
    """Batched MTCNN face detector (facenet-pytorch weights and defaults); a :class:`gpu_align.detect.FaceDetector`.

    Args:
        min_face_size: smallest face (px) searched for by default; ``detect(min_face_sizes=...)`` overrides it
            per image. Larger values skip the finest pyramid levels (the main speed lever for big photos).
        scale_factor: pyramid step (facenet-pytorch ``factor``).
        thresholds: P-Net, R-Net, O-Net face-probability thresholds (P-Net ``>=``, the others ``>``).
        nms_thresholds: IoU threshold within one pyramid level, IoU across levels and after R-Net,
            "Min" overlap after O-Net. (facenet-pytorch hard-codes 0.5 / 0.7 / 0.7.)
        weights_dir: folder with pnet.pt, rnet.pt, onet.pt (default: :func:`mtcnn_weights_dir`).
        device: where the networks run and the returned tensors live.
        dtype: P-Net and R-Net dtype (float16 is meant for CUDA; box arithmetic stays float32).
        onet_dtype: O-Net's dtype, float32 by default whatever ``dtype`` is: O-Net regresses the landmarks, and in
            float16 they moved ~0.25 px on a 500 px face (``train.lst`` stores 0.01 px), while O-Net is a small
            share of the detector's work.
        channels_last: run the convolutions in channels-last memory format. Default: on for CPU (P-Net ~1.5×
            faster there, measured), off for CUDA (turn it on with float16 for tensor-core convolutions).
        page_side, pnet_max_pixels, crop_batch, resample_chunk, pyramid_resample: how the work is cut (see
            :class:`Tuning`; they change speed and memory, not results). ``None`` picks per device type
            (``CPU_TUNING`` / ``CUDA_TUNING``): small, cache-sized pieces on CPU (3× faster there), few large
            launches on CUDA.
        tuning: ``"cuda"`` / ``"cpu"`` force that device type's work sizes *and code paths* (torch summed-area
            tables, no per-thread workspace) whatever the device: ``tuning="cuda"`` on CPU runs exactly what a GPU
            runs (the CI check of the CUDA branches, and ``benchmarks/bench_launches.py``'s op count). ``None``
            (default): the device's own.
    """

    name = "mtcnn"
    # Never select a face below this O-Net probability. The shipped photos' false positives (a hand and a glass in
    # insightface's t1.jpg) score up to ~0.86, every real face there > 0.99.
    score_floor = 0.9

    def __init__(
        self,
        *,
        min_face_size: float = 20,
        scale_factor: float = 0.709,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        nms_thresholds: Sequence[float] = (0.5, 0.7, 0.7),
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        onet_dtype: torch.dtype = torch.float32,
        channels_last: bool | None = None,
        page_side: int | None = None,
        pnet_max_pixels: int | None = None,
        crop_batch: int | None = None,
        resample_chunk: int | None = None,
        pyramid_resample: str | None = None,
        tuning: str | None = None,
    ) -> None:
        super().__init__()
        if not min_face_size > 0:
            raise ValueError(f"min_face_size must be > 0, got {min_face_size}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if len(thresholds) != 3 or len(nms_thresholds) != 3:
            raise ValueError("thresholds and nms_thresholds need three values (P-Net, R-Net, O-Net)")
        if not dtype.is_floating_point or not onet_dtype.is_floating_point:
            raise ValueError(f"dtype and onet_dtype must be floating point dtypes, got {dtype}, {onet_dtype}")
        self.min_face_size = float(min_face_size)
        self.scale_factor = float(scale_factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.nms_thresholds = tuple(float(t) for t in nms_thresholds)
        self.dtype = dtype
        self.onet_dtype = onet_dtype
        if channels_last is None:
            channels_last = torch.device(device).type == "cpu"
        self.channels_last = bool(channels_last)
        self._tuning_override = {
            "page_side": page_side,
            "pnet_max_pixels": pnet_max_pixels,
            "crop_batch": crop_batch,
            "resample_chunk": resample_chunk,
            "pyramid_resample": pyramid_resample,
        }
        if pyramid_resample not in (None, "levels", "flat"):
            raise ValueError(f"pyramid_resample must be 'levels' or 'flat', not {pyramid_resample!r}")
        if tuning not in (None, *TUNINGS):
            raise ValueError(f"tuning must be 'cpu' or 'cuda', not {tuning!r}")
        self._tuning_kind = tuning
        self._local = threading.local()  # per-thread scratch buffer (see _workspace)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        folder = Path(weights_dir) if weights_dir is not None else mtcnn_weights_dir()
        for name, net in zip(_WEIGHT_FILES, (self.pnet, self.rnet, self.onet), strict=True):
            path = folder / name
            if not path.is_file():
                raise MTCNNWeightsMissing(f"MTCNN weight file {path} not found; install: {INSTALL_HINT}")
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.eval()
        self.requires_grad_(False)
        self.to(device=device)
        # each net straight from the float32 checkpoint to its dtype (a float16 round trip would round O-Net's weights)
        for net, net_dtype in ((self.pnet, dtype), (self.rnet, dtype), (self.onet, onet_dtype)):
            net.to(dtype=net_dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @property
    def cuda_paths(self) -> bool:
        """Whether the CUDA code paths run: on a CUDA device, or forced with ``tuning="cuda"``."""
        return cuda_paths(self.device, self._tuning_kind)

    @property
    def tuning(self) -> Tuning:
        """Work sizes in effect (constructor overrides, else those of ``cuda_paths``' device type)."""
        base = CUDA_TUNING if self.cuda_paths else CPU_TUNING
        return Tuning(**{k: v if v is not None else getattr(base, k) for k, v in self._tuning_override.items()})

    # --- public API -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        *,
        min_face_sizes: float | Sequence[float | None] | None = None,
    ) -> list[Detections]:
        """Detect faces in a batch of RGB images of any sizes.

        Args:
            images: each (H, W, 3) uint8 RGB, a numpy array or a torch tensor on any device (copied to the
                detector's device).
            min_face_sizes: smallest face (px) per image (a sequence, ``None`` entries = default), or one value for
                all; default ``self.min_face_size``.
        Returns:
            One :class:`Detections` per image, in input order; faces sorted by descending score.
        """
        tensors = [self._as_tensor(im, i) for i, im in enumerate(images)]
        n_img = len(tensors)
        min_faces = self._min_faces(min_face_sizes, n_img)
        if n_img == 0:
            return []
        sizes = [(int(t.shape[0]), int(t.shape[1])) for t in tensors]
        tuning = self.tuning
        plan = plan_pyramid(sizes, min_faces, self.scale_factor, page_side=tuning.page_side)
        if len(plan) == 0:  # every image is smaller than its minimum face: not one pyramid level
            z = torch.zeros((0,), device=self.device)
            return self._split(z.view(0, 4), z, z.view(0, 5, 2), z.long(), n_img)
        ii = integral_images(tensors, self._workspace(), torch_scan=self.cuda_paths)
        self._keep_workspace(ii)
        boxes, image_index = self._stage1(ii, plan, tuning)
        boxes, image_index = self._stage2(ii, boxes, image_index, tuning)
        boxes, scores, landmarks, image_index = self._stage3(ii, boxes, image_index, tuning)
        return self._split(boxes, scores, landmarks, image_index, n_img)

    @torch.inference_mode()
    def onet_on_boxes(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        *,
        square: bool = True,
    ) -> list[Detections]:
        """MTCNN's last stage (O-Net) on candidate boxes found by something else, e.g. another detector.

        Every box is squared around its centre (``rerec``, as MTCNN does to R-Net's output), cropped and area-resampled
        to 48×48 from the summed-area tables, and scored by O-Net in batches; boxes with O-Net probability
        ``<= thresholds[2]`` are dropped, the rest get O-Net's box regression and five landmarks, then "Min" NMS at
        ``nms_thresholds[2]`` per image. Empty crops (boxes entirely outside their image) are dropped.

        Args:
            images: each (H, W, 3) uint8 RGB, numpy or torch on any device (copied to the detector's device).
            boxes: (N, 4) float x1 y1 x2 y2 in pixel coordinates of image ``image_index[n]``, any device.
            image_index: (N,) integer index into ``images`` of each box.
            square: ``False`` skips the squaring (for boxes that are square already: MTCNN's R-Net output gives
                then exactly ``detect``'s result).
        Returns:
            One :class:`Detections` per image, in input order; faces sorted by descending O-Net probability.
        """
        tensors = [self._as_tensor(im, i) for i, im in enumerate(images)]
        n_img = len(tensors)
        boxes = host_to_device(boxes, self.device, torch.float32).reshape(-1, 4)
        image_index = host_to_device(image_index, self.device, torch.int64).reshape(-1)
        if boxes.shape[0] != image_index.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes but {image_index.shape[0]} image indices")
        if boxes.shape[0] and not (int(image_index.min()) >= 0 and int(image_index.max()) < n_img):
            raise ValueError(f"image_index out of range for {n_img} images")
        if boxes.shape[0] == 0:
            z = torch.zeros((0,), device=self.device)
            return self._split(z.view(0, 4), z, z.view(0, 5, 2), z.long(), n_img)
        ii = integral_images(tensors, self._workspace(), torch_scan=self.cuda_paths)
        self._keep_workspace(ii)
        if square:
            boxes = _rerec(boxes)
        boxes, scores, landmarks, image_index = self._stage3(ii, boxes, image_index, self.tuning)
        return self._split(boxes, scores, landmarks, image_index, n_img)

    # --- stages -----------------------------------------------------------------------------------------------

    def _stage1(self, ii: IntegralImages, plan: PyramidPlan, tuning: Tuning) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the atlas; returns regressed, squared boxes (N, 4) float32 and their image (N,) int64."""
        device = ii.device
        calls = plan.calls(tuning.pnet_max_pixels)
        sels = [np.flatnonzero((plan.page >= first) & (plan.page < end)) for first, end, _ in calls]
        # Every plan array in one host→device transfer: the int64 ones, each call's placements, the scales.
        ints = np.concatenate(
            [np.stack([plan.image, plan.height, plan.width, plan.page, plan.y, plan.x]).ravel(), *sels]
        )
        scale32 = plan.scale.astype(np.float32)
        packed = torch.from_numpy(np.concatenate([ints.astype(np.int64).view(np.uint8), scale32.view(np.uint8)]))
        packed = packed.to(device, non_blocking=True)
        k_count = len(plan)
        ints_t = packed[: 8 * len(ints)].view(torch.int64)
        p_image, p_h, p_w, p_page, p_y, p_x = ints_t[: 6 * k_count].view(6, k_count)
        p_scale = packed[8 * len(ints) :].view(torch.float32)
        sel_ts, o = [], 6 * k_count
        for sel in sels:
            sel_ts.append(ints_t[o : o + len(sel)])
            o += len(sel)
        thr_p, _, _ = self.thresholds
        # P-Net outputs of every call, flattened and concatenated, so that one nonzero (one host sync) finds the
        # candidates of all calls and one NMS (per placement, which never spans calls) thins them.
        probs, cells, regs, shapes = [], [], [], []
        for (first, end, height), sel, sel_t in zip(calls, sels, sel_ts, strict=True):
            width = plan.page_width
            pages = end - first
            atlas = torch.zeros((pages, height, width, 3), dtype=self.dtype, device=device)
            ids = torch.full((pages, height, width), -1, dtype=torch.int32, device=device)
            if tuning.pyramid_resample == "levels":
                resample_levels_into(
                    ii,
                    plan.image[sel].tolist(),
                    plan.height[sel].tolist(),
                    plan.width[sel].tolist(),
                    (plan.page[sel] - first).tolist(),
                    plan.y[sel].tolist(),
                    plan.x[sel].tolist(),
                    sel.tolist(),
                    atlas,
                    ids,
                )
            else:
                page_base = (p_page[sel_t] - first) * (height * width)
                resample_ragged_into(
                    ii,
                    p_image[sel_t],
                    p_h[sel_t],
                    p_w[sel_t],
                    page_base + p_y[sel_t] * width + p_x[sel_t],
                    torch.full_like(page_base, width),
                    int((plan.height[sel] * plan.width[sel]).sum()),
                    atlas.view(-1, 3),
                    ids.view(-1),
                    sel_t,
                    max_pixels=tuning.resample_chunk,
                )
            x = atlas.permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            reg, prob, cell = self.pnet.forward_atlas(x, ids)
            probs.append(prob.reshape(-1))
            cells.append(cell.reshape(-1))
            regs.append(reg.permute(0, 2, 3, 1).reshape(-1, 4))  # (cells, 4), row-major like prob and cell
            shapes.append(prob.shape[1:])
        cat = (lambda v: v[0]) if len(calls) == 1 else torch.cat
        prob, cell, reg = cat(probs), cat(cells), cat(regs)
        idx = torch.nonzero((cell >= 0) & (prob >= thr_p))[:, 0]  # row-major, call by call: the per-call order
        place = cell[idx]
        score = prob[idx].float()
        offsets = reg[idx].float()
        # Cell (row ci, column cj) of each candidate on its page, from its flat index within its call.
        if len(calls) == 1:
            q, (oh, ow) = idx, shapes[0]
            call = None
        else:
            starts = np.cumsum([0, *(p.numel() for p in probs[:-1])])
            geo = torch.tensor(np.stack([starts, [h for h, _ in shapes], [w for _, w in shapes]]), dtype=torch.int64)
            geo = geo.to(device, non_blocking=True)
            call = torch.searchsorted(geo[0], idx, right=True) - 1
            q, oh, ow = idx - geo[0][call], geo[1][call], geo[2][call]
        cj = q % ow
        ci = torch.div(q, ow, rounding_mode="floor") % oh
        scale = p_scale[place]
        # facenet-pytorch generateBoundingBox: cell (x, y) → [floor((2x+1)/s), floor((2x+12)/s)].
        cx = (cj - torch.div(p_x[place], 2, rounding_mode="floor")).float()
        cy = (ci - torch.div(p_y[place], 2, rounding_mode="floor")).float()
        b = torch.stack(
            [
                ((2 * cx + 1) / scale).floor(),
                ((2 * cy + 1) / scale).floor(),
                ((2 * cx + 12) / scale).floor(),
                ((2 * cy + 12) / scale).floor(),
            ],
            dim=1,
        )
        keep = batched_nms(b, score, place, self.nms_thresholds[0])  # within each image × level
        if call is not None:  # call by call, as separate per-call NMS runs would list them (ties depend on it)
            keep = keep[torch.sort(call[keep], stable=True).indices]
        boxes, score, offsets, image_index = b[keep], score[keep], offsets[keep], p_image[place[keep]]
        keep = batched_nms(boxes, score, image_index, self.nms_thresholds[1])  # across levels, per image
        boxes, offsets, image_index = boxes[keep], offsets[keep], image_index[keep]
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        boxes = boxes + offsets * torch.cat([w, h, w, h], dim=1)  # P-Net regression uses sizes without +1
        return _rerec(boxes), image_index

    def _run_crops(self, net: nn.Module, ii: IntegralImages, y0, x0, h, w, image_index, size: int, batch: int):
        """Crop + resample all regions to size×size and run ``net`` in chunks of ``batch``; outputs as float32."""
        outs = []
        net_dtype = next(net.parameters()).dtype  # O-Net may run in float32 while the others run in float16
        for lo in range(0, image_index.shape[0], batch):
            hi = lo + batch
            crops = resample_crops(ii, image_index[lo:hi], y0[lo:hi], x0[lo:hi], h[lo:hi], w[lo:hi], size)
            crops = ((crops - 127.5) * 0.0078125).to(net_dtype)
            if self.channels_last:
                crops = crops.contiguous(memory_format=torch.channels_last)
            outs.append([o.float() for o in net(crops)])
        return [torch.cat(v) for v in zip(*outs, strict=True)]

    def _stage2(self, ii: IntegralImages, boxes: torch.Tensor, image_index: torch.Tensor, tuning: Tuning):
        """R-Net on 24×24 crops; returns refined, squared boxes and their image."""
        y0, x0, h, w, ok = _crop_regions(boxes, image_index, ii)
        # Drop empty crops; group by image so that the table gathers stay within one image (cache locality).
        pick = ok.nonzero()[:, 0]
        pick = pick[torch.sort(image_index[pick], stable=True).indices]
        boxes, image_index, y0, x0, h, w = (t[pick] for t in (boxes, image_index, y0, x0, h, w))
        if boxes.shape[0] == 0:
            return boxes, image_index
        reg, prob = self._run_crops(self.rnet, ii, y0, x0, h, w, image_index, 24, tuning.crop_batch)
        ok = (prob > self.thresholds[1]).nonzero()[:, 0]  # one host sync for all four (a mask would sync per tensor)
        boxes, image_index, reg, prob = boxes[ok], image_index[ok], reg[ok], prob[ok]
        keep = batched_nms(boxes, prob, image_index, self.nms_thresholds[1])
        return _rerec(_bbreg(boxes[keep], reg[keep])), image_index[keep]

    def _stage3(self, ii: IntegralImages, boxes: torch.Tensor, image_index: torch.Tensor, tuning: Tuning):
        """O-Net on 48×48 crops; returns final boxes, scores, landmarks (N, 5, 2) and image index."""
        y0, x0, h, w, ok = _crop_regions(boxes, image_index, ii)
        # Drop empty crops; group by image so that the table gathers stay within one image (cache locality).
        pick = ok.nonzero()[:, 0]
        pick = pick[torch.sort(image_index[pick], stable=True).indices]
        boxes, image_index, y0, x0, h, w = (t[pick] for t in (boxes, image_index, y0, x0, h, w))
        if boxes.shape[0] == 0:
            return boxes, boxes.new_zeros((0,)), boxes.new_zeros((0, 5, 2)), image_index
        batch = max(1, tuning.crop_batch // 4)  # 48×48 crops: a quarter as many per pass as 24×24 ones
        reg, points, prob = self._run_crops(self.onet, ii, y0, x0, h, w, image_index, 48, batch)
        ok = (prob > self.thresholds[2]).nonzero()[:, 0]  # one host sync for all five
        boxes, image_index, reg, points, prob = boxes[ok], image_index[ok], reg[ok], points[ok], prob[ok]
        # Landmarks are relative to the O-Net input box (before regression), +1 sizes and the -1 of 1-based crops.
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        px = bw * points[:, :5] + boxes[:, 0:1] - 1
        py = bh * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = torch.stack([px, py], dim=2)
        boxes = _bbreg(boxes, reg)
        keep = batched_nms(boxes, prob, image_index, self.nms_thresholds[2], mode="min")
        return boxes[keep], prob[keep], landmarks[keep], image_index[keep]

    # --- helpers ----------------------------------------------------------------------------------------------

    def _workspace(self) -> torch.Tensor | None:
        """This thread's buffer for the summed-area tables on CPU (grown to the largest batch seen), or None.

        Fresh tens-of-MB host allocations are page-faulted on every call (~1 ms per image, measured); CUDA's caching
        allocator already reuses memory, so no buffer is kept there.
        """
        return None if self.cuda_paths else getattr(self._local, "workspace", None)

    def _keep_workspace(self, ii: IntegralImages) -> None:
        if not self.cuda_paths:
            self._local.workspace = ii.buffer

    def _as_tensor(self, image: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
        return as_image_tensor(image, index, self.device)

    def _min_faces(self, min_face_sizes, n: int) -> list[float]:
        if min_face_sizes is None:
            values = [self.min_face_size] * n
        elif isinstance(min_face_sizes, (int, float)):
            values = [float(min_face_sizes)] * n
        else:
            values = [self.min_face_size if v is None else float(v) for v in min_face_sizes]
            if len(values) != n:
                raise ValueError(f"min_face_sizes has {len(values)} values for {n} images")
        for i, v in enumerate(values):
            if not v > 0:
                raise ValueError(f"min_face_sizes[{i}] must be > 0, got {v}")
        return values

    def _split(self, boxes, scores, landmarks, image_index, n_img: int) -> list[Detections]:
        """Per-image :class:`Detections`, keeping the (descending-score) order within each image."""
        order = torch.sort(image_index, stable=True).indices
        counts = torch.bincount(image_index, minlength=n_img).tolist()
        parts = zip(
            boxes[order].split(counts), scores[order].split(counts), landmarks[order].split(counts), strict=True
        )
        return [Detections(b, s, lm) for b, s, lm in parts]


__all__ = ["MTCNN", "Detections", "MTCNNWeightsMissing", "mtcnn_weights_dir"]
