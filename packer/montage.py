"""Contact sheets for ``inspect --montage``: a grid of labelled face crops (or crop pairs), written as an image."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from packer.errors import UserError

__all__ = ["montage", "save_montage"]

_CAPTION = 18  # caption strip height in pixels


def _fit(img: np.ndarray, height: int) -> np.ndarray:
    import cv2

    if img.shape[0] == height:
        return img
    width = max(1, round(img.shape[1] * height / img.shape[0]))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)


def montage(
    cells: Sequence[tuple[Sequence[np.ndarray], str]], *, cols: int = 8, height: int = 112, gap: int = 4
) -> np.ndarray:
    """Grid image of captioned cells: (H, W, 3) uint8 RGB.

    Args:
        cells: per cell, the images shown side by side (each (h, w, 3) uint8 RGB, scaled to ``height``) and a
            caption drawn under them (``None`` image = grey placeholder of size height × height).
        cols: cells per row.
    """
    import cv2

    if not cells:
        raise ValueError("no cells to draw")
    drawn = []
    for images, caption in cells:
        parts = [_fit(im, height) if im is not None else np.full((height, height, 3), 128, np.uint8) for im in images]
        row = np.concatenate([p for im in parts for p in (im, np.full((height, 2, 3), 255, np.uint8))][:-1], axis=1)
        strip = np.full((_CAPTION, row.shape[1], 3), 255, np.uint8)
        scale = 0.4
        caption = caption.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
        (tw, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        while tw > row.shape[1] - 2 and len(caption) > 1:  # shorten a long caption to fit its cell
            caption = caption[:-1]
            (tw, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.putText(strip, caption, (2, _CAPTION - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        drawn.append(np.concatenate([row, strip], axis=0))
    cell_h = max(d.shape[0] for d in drawn)
    cell_w = max(d.shape[1] for d in drawn)
    cols = max(1, min(cols, len(drawn)))
    rows = -(-len(drawn) // cols)
    sheet = np.full((rows * (cell_h + gap) + gap, cols * (cell_w + gap) + gap, 3), 255, np.uint8)
    for i, d in enumerate(drawn):
        r, c = divmod(i, cols)
        y, x = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
        sheet[y : y + d.shape[0], x : x + d.shape[1]] = d
    return sheet


def save_montage(path: str | os.PathLike, sheet: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB sheet; the format follows the extension (.png, .jpg...)."""
    import cv2

    try:
        ok = cv2.imwrite(os.fspath(path), np.ascontiguousarray(sheet[:, :, ::-1]))
    except cv2.error as e:
        raise UserError(f"{path}: cannot write the montage ({str(e).strip().splitlines()[-1]})") from None
    if not ok:
        raise UserError(f"{path}: cannot write the montage (unknown image extension or unwritable folder?)")
