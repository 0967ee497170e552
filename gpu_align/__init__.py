"""gpu-align: batched MTCNN face detection and ArcFace 112×112 alignment in torch (CPU or CUDA).

``from gpu_align import FaceAligner`` imports torch; the packer (``import packer``) does not.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FaceAligner", "__version__"]


def __getattr__(name: str):
    if name == "FaceAligner":
        from gpu_align.align import FaceAligner

        return FaceAligner
    raise AttributeError(f"module 'gpu_align' has no attribute {name!r}")
