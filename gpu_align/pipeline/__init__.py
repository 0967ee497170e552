"""``gpu-align run`` as a function: :func:`run` with :class:`RunOptions` -> :class:`RunResult`.

The run's list of stages is :mod:`.stages`; beside it, one module per concern: the options and their checks
(:mod:`.options`), the align stage (:mod:`.align_stage`), ``report.json`` (:mod:`.report`), the resume sidecar
(:mod:`.resume`) and the printed summary (:mod:`.summary`).
"""

from gpu_align.pipeline.options import RunOptions, RunResult, StageTimes, resolve_device
from gpu_align.pipeline.resume import INPUTS_NAME
from gpu_align.pipeline.stages import run
from packer.channel import PackerDied

__all__ = ["INPUTS_NAME", "PackerDied", "RunOptions", "RunResult", "StageTimes", "resolve_device", "run"]
