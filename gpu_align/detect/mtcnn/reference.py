"""facenet-pytorch 2.6.0's own MTCNN, runnable without torchvision: the reference for tests and benchmarks.

``import facenet_pytorch`` fails here (it needs torchvision, which has no build for this torch). Its detector only
uses one torchvision function, ``torchvision.ops.boxes.batched_nms``. This module executes the installed package's
unmodified ``models/utils/detect_face.py`` and the P/R/O-Net classes of ``models/mtcnn.py`` (source read from the
install, so what runs is facenet-pytorch's code and weights) with a plain numpy greedy NMS in place of
torchvision's (same semantics: descending score, IoU with areas (x2-x1)·(y2-y1), suppress when IoU > threshold,
independently per index). It is the per-image, per-box-loop algorithm that ``gpu_align.detect.mtcnn`` reimplements.
Not used by the pipeline.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from functools import cache
from pathlib import Path

import numpy as np
import torch

from gpu_align.detect.mtcnn import INSTALL_HINT, MTCNNWeightsMissing


def _greedy_nms_numpy(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = list(np.argsort(-scores, kind="stable"))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if not order:
            break
        rest = np.asarray(order)
        w = np.maximum(0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]))
        h = np.maximum(0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = [r for r, v in zip(order, iou, strict=True) if not v > threshold]
    return keep


def batched_nms_numpy(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float):
    """Stand-in for ``torchvision.ops.boxes.batched_nms`` (CPU, float32, kept indices by descending score)."""
    b = boxes.detach().cpu().float().numpy()
    s = scores.detach().cpu().float().numpy()
    g = idxs.detach().cpu().numpy()
    keep: list[int] = []
    for group in np.unique(g):
        members = np.flatnonzero(g == group)
        keep.extend(members[_greedy_nms_numpy(b[members], s[members], iou_threshold)].tolist())
    keep_arr = np.asarray(keep, dtype=np.int64)
    keep_arr = keep_arr[np.argsort(-s[keep_arr], kind="stable")] if len(keep_arr) else keep_arr
    return torch.as_tensor(keep_arr, dtype=torch.long, device=boxes.device)


def _facenet_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MTCNNWeightsMissing(f"facenet-pytorch is not installed; run: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _load() -> tuple[types.ModuleType, torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    root = _facenet_dir()
    # Provide the only torchvision names detect_face.py imports, just while its module body runs.
    fake = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms", "torchvision.ops")}
    fake["torchvision.transforms.functional"] = types.ModuleType("torchvision.transforms.functional")
    fake["torchvision.ops.boxes"] = types.ModuleType("torchvision.ops.boxes")
    fake["torchvision.ops.boxes"].batched_nms = batched_nms_numpy
    saved = {name: sys.modules.get(name) for name in fake}
    try:
        sys.modules.update(fake)
        spec = importlib.util.spec_from_file_location(
            "_facenet_reference_detect_face", root / "models" / "utils" / "detect_face.py"
        )
        detect_face = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(detect_face)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    # The network classes, from models/mtcnn.py without its package-relative import (the rest is unchanged).
    path = root / "models" / "mtcnn.py"
    source = path.read_text().replace("from .utils.detect_face import detect_face, extract_face", "")
    namespace = {"__file__": str(path), "__name__": "_facenet_reference_mtcnn"}
    exec(compile(source, str(path), "exec"), namespace)
    nets = [namespace[name]().eval() for name in ("PNet", "RNet", "ONet")]
    return detect_face, *nets


@cache
def _nets_on(device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """P/R/O-Net copies on ``device`` (the CPU ones of :func:`_load` stay where they are)."""
    _, *nets = _load()
    return tuple(copy.deepcopy(n).to(device) for n in nets)


def reference_detect(
    image: np.ndarray,
    *,
    min_face_size: float = 20,
    thresholds=(0.6, 0.7, 0.7),
    factor: float = 0.709,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """facenet-pytorch's ``detect_face`` on one (H, W, 3) uint8 RGB numpy image, on ``device`` (default CPU).

    Returns boxes (K, 4), scores (K,), landmarks (K, 5, 2) as float32 numpy, in facenet-pytorch's output order
    (descending score). Raises like facenet-pytorch does (e.g. on images too small for one pyramid level).
    """
    device = torch.device(device)
    module, *nets = _load()
    pnet, rnet, onet = nets if device.type == "cpu" else _nets_on(str(device))
    with torch.no_grad():
        boxes, points = module.detect_face(image, min_face_size, pnet, rnet, onet, list(thresholds), factor, device)
    b = np.asarray(boxes[0], dtype=np.float32).reshape(-1, 5)
    p = np.asarray(points[0], dtype=np.float32).reshape(-1, 5, 2)
    return b[:, :4], b[:, 4], p
