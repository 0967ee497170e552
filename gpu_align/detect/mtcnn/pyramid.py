"""MTCNN image pyramids of a whole batch, packed into a few "atlas" pages so P-Net runs once for all of them.

P-Net is fully convolutional with an output stride of 2, so running it on a large canvas that holds many resized
images side by side gives, for each image, exactly the outputs it would get alone, provided that

- every image starts at an even (y, x) offset, so its pooling windows and output cells line up with the canvas's;
- the networks never mix two images: conv1 outputs outside an image are set to a large negative value before the
  2×2 ceil-mode max-pool (a window that runs past the image's edge then takes the max over the image's own values,
  as the ceil-mode pool does on a lone image), pooled values outside an image are set to 0, and output cells whose
  receptive field is not inside one image are dropped (see ``PNet.forward_atlas`` in ``gpu_align.detect.mtcnn``).

Packing is shelf first-fit by decreasing height (host-side, O(levels · shelves), integers only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """facenet-pytorch's scale list for one image: 12/min_face · factor^k while the short side stays >= 12 px."""
    m = 12.0 / min_face_size
    minl = min(height, width) * m
    scales = []
    scale = m
    while minl >= 12:  # same float sequence as facenet-pytorch, so sizes and scales match it exactly
        scales.append(scale)
        scale = scale * factor
        minl = minl * factor
    return scales


@dataclass
class PyramidPlan:
    """Where every pyramid level ("placement") goes. Arrays have one entry per placement (host numpy)."""

    image: np.ndarray  # (K,) int64: source image
    scale: np.ndarray  # (K,) float64: resize factor of this level
    height: np.ndarray  # (K,) int64: resized size, int(H * scale + 1) like facenet-pytorch
    width: np.ndarray  # (K,) int64
    page: np.ndarray  # (K,) int64: atlas page
    y: np.ndarray  # (K,) int64: even offset on the page
    x: np.ndarray  # (K,) int64
    page_width: int
    page_heights: list[int]  # used (even) height of each page

    def __len__(self) -> int:
        return len(self.image)

    def calls(self, max_pixels: int) -> list[tuple[int, int, int]]:
        """Consecutive page ranges ``(first, end, height)`` to run as one P-Net batch of ``(end-first, 3, height,
        page_width)``: at most ``max_pixels`` canvas pixels (or one page) per call, similar heights grouped."""
        out: list[tuple[int, int, int]] = []
        first = 0
        for p in range(1, len(self.page_heights) + 1):
            if p < len(self.page_heights):
                h_call = max(self.page_heights[first : p + 1])
                fits = (p + 1 - first) * h_call * self.page_width <= max_pixels
                similar = self.page_heights[p] * 4 >= h_call * 3
                if fits and similar:
                    continue
            out.append((first, p, max(self.page_heights[first:p])))
            first = p
        return out


def plan_pyramid(
    sizes: Sequence[tuple[int, int]],
    min_face_sizes: Sequence[float],
    factor: float,
    *,
    page_side: int = 2048,
) -> PyramidPlan:
    """Scales of every image and their packing into pages of width <= ``page_side`` (wider if one level is).

    Args:
        sizes: (H, W) of each image.
        min_face_sizes: smallest face (px) to look for in each image; sets the finest level (12 / min_face).
        factor: scale step between levels (facenet-pytorch default 0.709).
        page_side: target page width and height limit; one big level gets a page of its own size.
    """
    image, scale, hs, ws = [], [], [], []
    for b, ((h, w), mf) in enumerate(zip(sizes, min_face_sizes, strict=True)):
        for s in pyramid_scales(h, w, mf, factor):
            image.append(b)
            scale.append(s)
            hs.append(int(h * s + 1))
            ws.append(int(w * s + 1))
    k = len(image)
    height = np.asarray(hs, dtype=np.int64)
    width = np.asarray(ws, dtype=np.int64)
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return PyramidPlan(empty, np.zeros(0), height, width, empty, empty, empty, 0, [])
    fh = height + height % 2  # footprints rounded up to even, so every offset stays even
    fw = width + width % 2
    height_limit = int(max(fh.max(), page_side))
    # Width: the page side for big batches; for small ones about the square root of the total area. Shelf packing
    # of a geometric series is sensitive to it, so try a few widths and keep the smallest canvas (cheap: K rects).
    area = int((fh * fw).sum())
    widest = int(fw.max())
    candidates = {max(widest, min(page_side, 2 * math.ceil(math.sqrt(area * f) / 2))) for f in (1.0, 1.2, 1.5, 2.0)}
    best = None
    for page_width in sorted(candidates):
        packed = _shelf_pack(fh, fw, page_width, height_limit)
        cost = sum(packed[3]) * page_width
        if best is None or cost < best[0]:
            best = (cost, page_width, packed)
    _, page_width, (page, y, x, page_heights) = best
    return PyramidPlan(
        image=np.asarray(image, dtype=np.int64),
        scale=np.asarray(scale, dtype=np.float64),
        height=height,
        width=width,
        page=page,
        y=y,
        x=x,
        page_width=page_width,
        page_heights=page_heights,
    )


def _shelf_pack(fh: np.ndarray, fw: np.ndarray, page_width: int, height_limit: int):
    """Shelf first-fit by decreasing height. Returns page, y, x (K,) int64 and the used height of each page."""
    k = len(fh)
    page = np.zeros(k, dtype=np.int64)
    y = np.zeros(k, dtype=np.int64)
    x = np.zeros(k, dtype=np.int64)
    shelves: list[list[int]] = []  # [page, y, x_used]; a shelf's height is that of its first (tallest) item
    page_heights: list[int] = []
    for i in np.argsort(-fh, kind="stable").tolist():
        h, w = int(fh[i]), int(fw[i])
        for shelf in shelves:
            if page_width - shelf[2] >= w:  # shelves only get lower, so any open shelf is tall enough
                break
        else:
            if not page_heights or page_heights[-1] + h > height_limit:
                page_heights.append(0)
            shelf = [len(page_heights) - 1, page_heights[-1], 0]
            page_heights[-1] += h
            shelves.append(shelf)
        page[i], y[i], x[i] = shelf[0], shelf[1], shelf[2]
        shelf[2] += w
    return page, y, x, page_heights
