"""Face-selection policy: which detected face of a photo is *the* face (one target face per dataset photo).

Face datasets (VGGFace2, CASIA-WebFace, ...) are loosely cropped around one person, who is usually the largest
face near the centre; other faces are bystanders. InsightFace's align scripts (taken from facenet's
``align_dataset_mtcnn.py``) kept the face maximising ``box_area - 2 * offset²`` (offset = distance from the box
centre to the image centre, in pixels; both terms scale with the square of the image size). That is the
default here, ``"center-largest"``.

Policies (``POLICIES``):

- ``"center-largest"``: maximise ``area - 2·offset²`` (InsightFace / facenet).
- ``"largest"``: the largest box.
- ``"best-score"``: the most confident detection.
- ``"center"``: the box whose centre is nearest the image centre.

The selection is vectorised over all faces of all images of a batch (one segmented arg-max, no Python loop
over images or faces). Ties go to the earlier detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

POLICIES = ("center-largest", "largest", "best-score", "center")


class _Dets(Protocol):  # gpu_align.mtcnn.Detections
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor


SelectFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def face_keys(policy: str, boxes: torch.Tensor, scores: torch.Tensor, image_hw: torch.Tensor) -> torch.Tensor:
    """Per-face preference (higher = better) under ``policy``.

    ``boxes (K, 4)`` x1 y1 x2 y2 and ``scores (K,)`` float; ``image_hw (K, 2)`` the (H, W) of each face's image.
    Returns ``(K,)`` float32 on the boxes' device.
    """
    boxes = boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw = image_hw.to(boxes)
    offset2 = (cx - hw[:, 1] / 2) ** 2 + (cy - hw[:, 0] / 2) ** 2
    if policy == "center-largest":
        return area - 2.0 * offset2
    if policy == "largest":
        return area
    if policy == "best-score":
        return scores.float()
    if policy == "center":
        return -offset2
    raise ValueError(f"unknown face-selection policy {policy!r}; choose one of {', '.join(POLICIES)}")


def select_faces(
    detections: Sequence[_Dets],
    image_hw: torch.Tensor | Sequence[tuple[int, int]],
    policy: str | SelectFn = "center-largest",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one face per image.

    Args:
        detections: per image, ``boxes (K_i, 4)``, ``scores (K_i,)``, ``landmarks (K_i, 5, 2)`` (all on one device).
        image_hw: ``(B, 2)`` (H, W) per image.
        policy: a name from ``POLICIES``, or a callable ``(boxes, scores, landmarks, image_hw) -> keys`` over the
            concatenated faces (``(K, 4)``, ``(K,)``, ``(K, 5, 2)``, ``(K, 2)``) returning ``(K,)`` preferences.

    Returns:
        ``(found (B,) bool, boxes (B, 4), scores (B,), landmarks (B, 5, 2), num_faces (B,) int64)`` on the
        detections' device; rows without a face are NaN (float outputs).
    """
    B = len(detections)
    device = detections[0].boxes.device if B else torch.device("cpu")
    hw = torch.as_tensor(image_hw, dtype=torch.float32, device=device).reshape(B, 2)
    counts = torch.tensor([len(d.scores) for d in detections], dtype=torch.long, device=device)
    nan = float("nan")
    boxes_out = torch.full((B, 4), nan, device=device)
    scores_out = torch.full((B,), nan, device=device)
    lm_out = torch.full((B, 5, 2), nan, device=device)
    found = counts > 0
    if B == 0 or int(counts.sum()) == 0:
        return found, boxes_out, scores_out, lm_out, counts

    boxes = torch.cat([d.boxes.float().reshape(-1, 4) for d in detections])
    scores = torch.cat([d.scores.float().reshape(-1) for d in detections])
    lms = torch.cat([d.landmarks.float().reshape(-1, 5, 2) for d in detections])
    img = torch.repeat_interleave(torch.arange(B, device=device), counts)  # (K,) image of each face
    if callable(policy):
        keys = torch.as_tensor(policy(boxes, scores, lms, hw[img]), device=device).float().reshape(-1)
    else:
        keys = face_keys(policy, boxes, scores, hw[img])
    keys = torch.nan_to_num(keys, nan=-torch.inf)
    # segmented arg-max: the best key per image, then the first face of that image reaching it
    best = torch.full((B,), -torch.inf, device=device).scatter_reduce(0, img, keys, "amax", include_self=True)
    K = keys.numel()
    pos = torch.arange(K, device=device)
    cand = torch.where(keys == best[img], pos, torch.full_like(pos, K))
    first = torch.full((B,), K, dtype=torch.long, device=device).scatter_reduce(0, img, cand, "amin")
    # an image whose faces all have key -inf (NaN keys) still gets its first face
    start = torch.cumsum(counts, 0) - counts
    first = torch.where(first < K, first, start)
    sel = first[found]
    boxes_out[found] = boxes[sel]
    scores_out[found] = scores[sel]
    lm_out[found] = lms[sel]
    return found, boxes_out, scores_out, lm_out, counts
