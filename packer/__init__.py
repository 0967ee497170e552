"""gpu-align's packer: InsightFace-compatible RecordIO datasets without mxnet (imports without torch)."""

from packer import recordio

__all__ = ["recordio"]
