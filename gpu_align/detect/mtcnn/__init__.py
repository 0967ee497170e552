"""MTCNN (P-Net → R-Net → O-Net), batched in pure torch: the model (:mod:`.model`) and its parts, the pyramid
atlas plan (:mod:`.pyramid`), summed-area-table resampling (:mod:`.resample`) and facenet-pytorch's own per-image
code as the reference it is tested against (:mod:`.reference`)."""

from gpu_align.detect.base import Detections
from gpu_align.detect.mtcnn.model import (
    CPU_TUNING,
    CUDA_TUNING,
    INSTALL_HINT,
    MTCNN,
    MTCNNWeightsMissing,
    ONet,
    PNet,
    RNet,
    Tuning,
    mtcnn_weights_dir,
)

__all__ = [
    "CPU_TUNING",
    "CUDA_TUNING",
    "INSTALL_HINT",
    "MTCNN",
    "Detections",
    "MTCNNWeightsMissing",
    "ONet",
    "PNet",
    "RNet",
    "Tuning",
    "mtcnn_weights_dir",
]
