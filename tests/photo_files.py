"""Small helpers that write real photo files for the end-to-end tests, and published reference values the tests
compare with (shared, so each test file does not copy them)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# InsightFace's published ArcFace 112×112 landmarks, typed from insightface/utils/face_align.py (``arcface_dst``,
# insightface 2.1): eyeL, eyeR, nose, mouthL, mouthR as (x, y). Tests compare the project's template with these.
ARCFACE_DST_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Write ``(H, W, 3)`` uint8 RGB as a JPEG file (OpenCV wants BGR)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(buf.tobytes())


def scaled(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` resized (area) so that its longer side is ``side`` pixels."""
    s = side / max(rgb.shape[:2])
    return cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
