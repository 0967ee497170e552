"""Align stage: the similarity fit of five landmarks to the ArcFace template and the batched warp to 112×112
(:mod:`.warp`), and :class:`FaceAligner`, which runs detect → select → warp on a batch of photos (:mod:`.aligner`)."""

from gpu_align.align.aligner import AlignResult, FaceAligner

__all__ = ["AlignResult", "FaceAligner"]
