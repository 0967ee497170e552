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

A confidence floor comes first: a detection scoring below ``min_score`` is never the photo's face, whatever the
policy (MTCNN fires at p ≈ 0.86 on a hand and a glass in insightface's ``t1.jpg``; with the default floor those
are never chosen). Among several confident faces the policy chooses, and the runner-up is returned too, so that a
run can record every *multi-face* photo with both boxes instead of choosing silently.

The selection is vectorised over all faces of all images of a batch (segmented arg-max, no Python loop over
images or faces). Ties go to the earlier detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch

from gpu_align.device import host_to_device, to_device

POLICIES = ("center-largest", "largest", "best-score", "center")


class _Dets(Protocol):  # gpu_align.detect.mtcnn.Detections
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


class Selection(NamedTuple):
    """The face chosen per image, and the runner-up (the next best confident face), on the detections' device.

    Float rows without a face are NaN. ``num_faces`` counts every detection, ``num_confident`` those at or above
    the score floor (the candidates); a photo with ``num_confident >= 2`` is a *multi-face* photo, where the
    policy made a choice that the run records with its runner-up.
    """

    found: torch.Tensor  # (B,) bool, a confident face was selected
    boxes: torch.Tensor  # (B, 4) float32 x1 y1 x2 y2
    scores: torch.Tensor  # (B,) float32
    landmarks: torch.Tensor  # (B, 5, 2) float32
    num_faces: torch.Tensor  # (B,) int64, all detections
    num_confident: torch.Tensor  # (B,) int64, detections with score >= min_score
    best_score: torch.Tensor  # (B,) float32, the highest score of any detection (NaN if none): why a photo missed
    runner_up_boxes: torch.Tensor  # (B, 4) float32, NaN unless num_confident >= 2
    runner_up_scores: torch.Tensor  # (B,) float32


def segmented_argmax(keys: torch.Tensor, img: torch.Tensor, B: int) -> torch.Tensor:
    """Per image, the first face reaching the image's largest key; ``K`` (= no face) where every key is -inf.

    ``keys (K,)`` float, ``img (K,)`` int64 image of each face. Returns ``(B,)`` int64.
    """
    K = keys.numel()
    best = torch.full((B,), -torch.inf, device=keys.device).scatter_reduce(0, img, keys, "amax", include_self=True)
    pos = torch.arange(K, device=keys.device)
    cand = torch.where((keys == best[img]) & (keys > -torch.inf), pos, torch.full_like(pos, K))
    return torch.full((B,), K, dtype=torch.long, device=keys.device).scatter_reduce(0, img, cand, "amin")


def select_faces(
    detections: Sequence[_Dets],
    image_hw: torch.Tensor | Sequence[tuple[int, int]],
    policy: str | SelectFn = "center-largest",
    min_score: float = 0.0,
) -> Selection:
    """Pick one face per image: the policy's best among the faces scoring at least ``min_score``.

    Args:
        detections: per image, ``boxes (K_i, 4)``, ``scores (K_i,)``, ``landmarks (K_i, 5, 2)`` (all on one device).
        image_hw: ``(B, 2)`` (H, W) per image.
        policy: a name from ``POLICIES``, or a callable ``(boxes, scores, landmarks, image_hw) -> keys`` over the
            concatenated faces (``(K, 4)``, ``(K,)``, ``(K, 5, 2)``, ``(K, 2)``) returning ``(K,)`` preferences.
        min_score: confidence floor; a detection below it is never selected (a photo whose detections are all
            below it has no face). NaN keys rank last but still count.

    Returns:
        :class:`Selection` on the detections' device.
    """
    B = len(detections)
    device = detections[0].boxes.device if B else torch.device("cpu")
    hw = host_to_device(image_hw, device, torch.float32).reshape(B, 2)
    sizes = [len(d.scores) for d in detections]  # host shapes: the total needs no device read
    counts = to_device(torch.tensor(sizes, dtype=torch.long), device)
    nan = float("nan")

    def rows(*shape: int) -> torch.Tensor:
        return torch.full((B, *shape), nan, device=device)

    boxes_out, scores_out, lm_out, best_out, ru_boxes, ru_scores = rows(4), rows(), rows(5, 2), rows(), rows(4), rows()
    if B == 0 or sum(sizes) == 0:
        zero = torch.zeros_like(counts)
        return Selection(counts > 0, boxes_out, scores_out, lm_out, counts, zero, best_out, ru_boxes, ru_scores)

    boxes = torch.cat([d.boxes.float().reshape(-1, 4) for d in detections])
    scores = torch.cat([d.scores.float().reshape(-1) for d in detections])
    lms = torch.cat([d.landmarks.float().reshape(-1, 5, 2) for d in detections])
    img = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=sum(sizes))  # (K,) face's image
    if callable(policy):
        keys = torch.as_tensor(policy(boxes, scores, lms, hw[img]), device=device).float().reshape(-1)
    else:
        keys = face_keys(policy, boxes, scores, hw[img])
    confident = scores >= min_score
    # NaN keys rank below every real key but above "not a candidate": shift them to the float32 minimum
    keys = torch.nan_to_num(keys, nan=torch.finfo(torch.float32).min, neginf=torch.finfo(torch.float32).min)
    keys = torch.where(confident, keys, -torch.inf)
    K = keys.numel()
    first = segmented_argmax(keys, img, B)
    found = first < K
    best_out.scatter_reduce_(0, img, scores, "amax", include_self=False)
    num_confident = torch.zeros_like(counts).scatter_add_(0, img, confident.long())
    sel = first[found]
    boxes_out[found], scores_out[found], lm_out[found] = boxes[sel], scores[sel], lms[sel]
    # the runner-up: the best remaining confident face once the chosen one is out
    keys[sel] = -torch.inf
    second = segmented_argmax(keys, img, B)
    has2 = second < K
    ru_boxes[has2], ru_scores[has2] = boxes[second[has2]], scores[second[has2]]
    return Selection(found, boxes_out, scores_out, lm_out, counts, num_confident, best_out, ru_boxes, ru_scores)
