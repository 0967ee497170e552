"""What every face detector returns and promises (one file per implementation beside this one).

A detector takes a batch of photos of any sizes and returns, per photo, every face it found with a box, a score
and the five ArcFace landmarks. Selection of *the* face of a photo (``gpu_align.detect.select``) and the warp do not
care which detector produced them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from gpu_align.device import to_device


class Detections(NamedTuple):
    """Faces found in one image, sorted by descending score; tensors on the detector's device."""

    boxes: torch.Tensor  # (K, 4) float32 x1 y1 x2 y2, pixel coordinates of that image
    scores: torch.Tensor  # (K,) float32 face confidence in [0, 1] (its meaning depends on the detector)
    landmarks: torch.Tensor  # (K, 5, 2) float32 (x, y): eyeL eyeR nose mouthL mouthR (image left/right)


def empty_detections(device: torch.device | str = "cpu") -> Detections:
    """No face: ``(0, 4)``, ``(0,)``, ``(0, 5, 2)`` float32 on ``device``."""
    z = torch.zeros((0,), device=device)
    return Detections(z.view(0, 4).clone(), z.clone(), z.view(0, 5, 2).clone())


def as_image_tensor(image: np.ndarray | torch.Tensor, index: int, device: torch.device) -> torch.Tensor:
    """A detector's input check: ``(H, W, 3)`` uint8 on ``device``, or ``TypeError``/``ValueError`` naming the image.

    An empty image is valid (it has no faces). Copies host→CUDA asynchronously only (a non-blocking copy to the
    host could be read before it lands).
    """
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (e.g. from PIL) are fine: they are only read
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(np.ascontiguousarray(image))
    elif not isinstance(image, torch.Tensor):
        raise TypeError(f"image {index}: expected a numpy array or torch tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(
            f"image {index}: expected an (H, W, 3) uint8 RGB image, got shape {tuple(image.shape)} {image.dtype}"
        )
    return to_device(image, device)


class FaceDetector(Protocol):
    """A batched face detector.

    Attributes:
        name: the ``--detector`` name (``"mtcnn"``, ``"cascade"``, ``"retinaface"``).
        device: where it runs and where its outputs live.
        score_floor: default confidence below which a detection is never selected as a photo's face (chosen per
            detector from its false positives on the shipped photos; see README "Detection").
    """

    name: str
    score_floor: float

    @property
    def device(self) -> torch.device: ...

    def detect(self, images: Sequence[torch.Tensor], *, min_face_sizes: Sequence[float]) -> list[Detections]:
        """Every face per image.

        Args:
            images: ``(H, W, 3)`` uint8 RGB tensors on ``device``, any sizes (each at least ``min_face_sizes[i]``
                on its shorter side).
            min_face_sizes: per image, the smallest face (px) to search for; smaller faces may be left out.

        Returns:
            One :class:`Detections` per image, in input order, faces sorted by descending score.
        """
        ...
