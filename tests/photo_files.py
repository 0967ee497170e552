"""Small helpers that write real photo files for the end-to-end tests (shared, so each test file does not copy them)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Write ``(H, W, 3)`` uint8 RGB as a JPEG file (OpenCV wants BGR)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(buf.tobytes())


def scaled(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` resized (area) so that its longer side is ``side`` pixels."""
    s = side / max(rgb.shape[:2])
    return cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
