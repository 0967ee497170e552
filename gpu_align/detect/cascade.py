"""``--detector cascade``: a Viola–Jones (LBP) frontal-face cascade for the box, MTCNN's O-Net for the landmarks.

scikit-image's cascade (``skimage.feature.Cascade`` with ``lbpcascade_frontalface_opencv.xml``, OpenCV's LBP
frontal-face model; OpenCV 5 itself has no ``CascadeClassifier``) finds face boxes on the CPU, one image at a time.
Its box is a tight square around eyes, nose and mouth; a fixed expansion (measured on the shipped photos, see
``BOX_SCALE``/``BOX_SHIFT``) turns it into the MTCNN-style face box O-Net was trained on, and all boxes of a batch go
to O-Net in one call on the detector's device (:meth:`gpu_align.detect.mtcnn.MTCNN.onet_on_boxes`). O-Net supplies the
five landmarks, a refined box and the score; a cascade box O-Net rejects (probability ``<= thresholds[2]``) is
dropped, never guessed: :attr:`CascadeDetector.last_miss_reasons` says why a photo got no face.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from gpu_align.detect.base import Detections
from gpu_align.detect.mtcnn import MTCNN
from gpu_align.device import host_to_device
from gpu_align.errors import DetectorError

INSTALL_HINT = "pip install scikit-image"
# Cascade box (side w, centre c) → O-Net input box: side BOX_SCALE·w, centre c + BOX_SHIFT·w (x, y). Measured on
# the shipped photos' ten faces: MTCNN's final (squared) box is a median 1.22·w, centred +0.02·w right and down of
# the cascade box's centre (spread ±0.2 in scale); a grid over scale 1.0–1.5 × vertical shift −0.1…+0.15 put the
# lowest landmark error against MTCNN, with every face kept, at 1.2 and no shift.
BOX_SCALE = 1.2
BOX_SHIFT = (0.0, 0.0)
# skimage's rgb2gray weights (ITU-R 709), so that a 2-D image given to the cascade matches its own conversion.
_GRAY = (0.2125, 0.7154, 0.0721)

MISS_NO_CASCADE_BOX = "no cascade box"
MISS_ONET_REJECTED = "cascade box rejected by O-Net"


def _cascade_class():
    """``skimage.feature.Cascade`` and the LBP face model's path, or a :class:`~gpu_align.errors.DetectorError`
    saying how to install."""
    try:
        from skimage import data
        from skimage.feature import Cascade
    except ImportError as e:
        raise DetectorError(f"--detector cascade needs scikit-image ({e}); install it with: {INSTALL_HINT}") from e
    return Cascade, data.lbp_frontal_face_cascade_filename()


class CascadeDetector:
    """Viola–Jones (LBP) face boxes (scikit-image, CPU) + MTCNN O-Net landmarks (``device``); a
    :class:`gpu_align.detect.FaceDetector`.

    Args:
        device, dtype, channels_last: for its internal :class:`~gpu_align.detect.mtcnn.MTCNN` (O-Net always runs in
            float32: its landmarks are the output).
        scale_factor, step_ratio, min_neighbor_number, intersection_score_threshold: of skimage's
            ``Cascade.detect_multi_scale`` (window growth per scale, scan step in windows, detections needed to
            accept a group, overlap that merges two detections).
        min_size: smallest cascade window (px) in the image the cascade scans. Each photo is first downscaled
            (never upscaled) so that its smallest wanted face (``min_face_sizes[i]``) maps to this window.
        max_size: largest window (px) in that scanned image; ``None``: the image's shorter side.
        box_scale, box_shift: cascade box → O-Net input box (see ``BOX_SCALE``, ``BOX_SHIFT``).
        refine_passes: further O-Net passes on O-Net's own regressed boxes (1: landmarks closest to MTCNN's).
        threads: cascade worker threads (skimage's scan runs without the GIL); ``None``: ``torch.get_num_threads()``.
        **mtcnn_options: other :class:`gpu_align.detect.mtcnn.MTCNN` keywords (``thresholds``, ``nms_thresholds``, ...).
    """

    name = "cascade"
    score_floor = MTCNN.score_floor  # the score is O-Net's probability: the same rule as MTCNN's

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool | None = None,
        scale_factor: float = 1.2,
        step_ratio: float = 1.0,
        min_size: int = 24,
        max_size: int | None = None,
        min_neighbor_number: int = 2,
        intersection_score_threshold: float = 0.5,
        box_scale: float = BOX_SCALE,
        box_shift: tuple[float, float] = BOX_SHIFT,
        refine_passes: int = 1,
        threads: int | None = None,
        **mtcnn_options,
    ) -> None:
        self._cascade_cls, self._cascade_file = _cascade_class()
        if not scale_factor > 1:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if not step_ratio > 0:
            raise ValueError(f"step_ratio must be > 0, got {step_ratio}")
        if min_size < 24:
            raise ValueError(f"min_size must be >= 24 (the cascade's window), got {min_size}")
        if not box_scale > 0:
            raise ValueError(f"box_scale must be > 0, got {box_scale}")
        self.scale_factor = float(scale_factor)
        self.step_ratio = float(step_ratio)
        self.min_size = int(min_size)
        self.max_size = None if max_size is None else int(max_size)
        self.min_neighbor_number = int(min_neighbor_number)
        self.intersection_score_threshold = float(intersection_score_threshold)
        self.box_scale = float(box_scale)
        self.box_shift = (float(box_shift[0]), float(box_shift[1]))
        if refine_passes < 0:
            raise ValueError(f"refine_passes must be >= 0, got {refine_passes}")
        self.refine_passes = int(refine_passes)
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        self.mtcnn = MTCNN(device=device, dtype=dtype, channels_last=channels_last, **mtcnn_options)
        self._local = threading.local()  # one Cascade per thread (its C state is not documented as shareable)
        self._pool: ThreadPoolExecutor | None = None
        # Of the last detect() call (per image; one detector shared by threads overwrites them).
        self.last_box_counts: list[int] = []
        self.last_miss_reasons: list[str | None] = []

    @property
    def device(self) -> torch.device:
        return self.mtcnn.device

    # --- public API -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        *,
        min_face_sizes: float | Sequence[float | None] | None = None,
    ) -> list[Detections]:
        """Faces in a batch of RGB images of any sizes.

        Args:
            images: each (H, W, 3) uint8 RGB, numpy or torch on any device (copied to ``device``).
            min_face_sizes: smallest face (px, MTCNN box side) per image, or one value; default the MTCNN default.
        Returns:
            One :class:`Detections` per image, in input order, sorted by descending O-Net probability; boxes and
            landmarks in that image's pixel coordinates (float32 on ``device``). Also sets ``last_box_counts``
            (cascade boxes per image) and ``last_miss_reasons`` (per image ``None`` when a face was found, else
            ``"no cascade box"`` or ``"cascade box rejected by O-Net"``), for the last call only.
        """
        m = self.mtcnn
        tensors = [m._as_tensor(im, i) for i, im in enumerate(images)]
        min_faces = m._min_faces(min_face_sizes, len(tensors))
        if not tensors:
            self.last_box_counts, self.last_miss_reasons = [], []
            return []
        per_image = self._boxes_per_image(tensors, min_faces)
        counts = [len(b) for b in per_image]
        boxes = torch.from_numpy(np.concatenate([np.zeros((0, 4), np.float32), *per_image]))
        index = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(counts, dtype=torch.int64))
        dets = m.onet_on_boxes(tensors, self._onet_boxes(boxes), index)
        for _ in range(self.refine_passes):
            # O-Net again on its own regressed boxes: MTCNN's O-Net sees R-Net's near-final boxes, and a second pass
            # from the coarse cascade box halves the landmark error against MTCNN (measured; a third one drifts).
            n_per = torch.tensor([d.boxes.shape[0] for d in dets], dtype=torch.int64)
            again = torch.repeat_interleave(torch.arange(len(tensors)), n_per)
            dets = m.onet_on_boxes(tensors, torch.cat([d.boxes for d in dets]), again)
        self.last_box_counts = counts
        self.last_miss_reasons = [
            None if d.scores.shape[0] else (MISS_ONET_REJECTED if c else MISS_NO_CASCADE_BOX)
            for d, c in zip(dets, counts, strict=True)
        ]
        return dets

    def cascade_boxes(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        *,
        min_face_sizes: float | Sequence[float | None] | None = None,
    ) -> list[np.ndarray]:
        """The cascade's own boxes per image: (K, 4) float32 x1 y1 x2 y2 numpy, original pixel coordinates."""
        tensors = [self.mtcnn._as_tensor(im, i) for i, im in enumerate(images)]
        return self._boxes_per_image(tensors, self.mtcnn._min_faces(min_face_sizes, len(tensors)))

    # --- steps ------------------------------------------------------------------------------------------------

    def _boxes_per_image(self, tensors: list[torch.Tensor], min_faces: list[float]) -> list[np.ndarray]:
        # Gray + downscale on the device one image at a time (sizes differ), then the CPU scans on the thread pool.
        scans = [self._scan_image(t, f) for t, f in zip(tensors, min_faces, strict=True)]
        return list(self._map(self._cascade_boxes, scans))

    def _scan_image(self, image: torch.Tensor, min_face: float) -> tuple[np.ndarray, float]:
        """Grayscale (h, w) float32 numpy copy for the cascade, downscaled by ``s <= 1`` (area) so that a
        ``min_face`` px face's cascade box (``min_face / box_scale``) is ``min_size`` px; returns it and ``s``."""
        h, w = int(image.shape[0]), int(image.shape[1])
        s = min(1.0, self.min_size * self.box_scale / min_face)
        weights = host_to_device(_GRAY, image.device, torch.float32)
        gray = image.float() @ weights  # (H, W); the colour→gray and resize run on the detector's device
        oh, ow = max(1, round(h * s)), max(1, round(w * s))
        if (oh, ow) != (h, w):
            gray = F.interpolate(gray[None, None], size=(oh, ow), mode="area")[0, 0]
        return gray.cpu().numpy(), s if (oh, ow) != (h, w) else 1.0

    def _cascade_boxes(self, scan: tuple[np.ndarray, float]) -> np.ndarray:
        gray, s = scan
        h, w = gray.shape
        side = min(h, w)
        if side <= self.min_size:  # no window fits (skimage requires the window strictly inside)
            return np.zeros((0, 4), np.float32)
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = self._cascade_cls(self._cascade_file)
        found = cascade.detect_multi_scale(
            img=gray,
            scale_factor=self.scale_factor,
            step_ratio=self.step_ratio,
            min_size=(self.min_size, self.min_size),
            max_size=(self.max_size or side,) * 2,
            min_neighbor_number=self.min_neighbor_number,
            intersection_score_threshold=self.intersection_score_threshold,
        )
        if not found:
            return np.zeros((0, 4), np.float32)
        rcwh = np.array([(d["r"], d["c"], d["width"], d["height"]) for d in found], np.float32)
        x1, y1 = rcwh[:, 1], rcwh[:, 0]
        return np.stack([x1, y1, x1 + rcwh[:, 2], y1 + rcwh[:, 3]], axis=1) / np.float32(s)

    def _onet_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Cascade boxes (N, 4) → the MTCNN-style square face boxes O-Net expects (N, 4), float32."""
        side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5 + self.box_shift[0] * side
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5 + self.box_shift[1] * side
        half = side * (0.5 * self.box_scale)
        return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)

    def _map(self, fn, items: list):
        if self.threads == 1 or len(items) < 2:
            return map(fn, items)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cascade")
        return self._pool.map(fn, items)


__all__ = ["MISS_NO_CASCADE_BOX", "MISS_ONET_REJECTED", "CascadeDetector"]
