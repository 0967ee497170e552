"""What a run writes into ``report.json`` beside the packer's own counts: the settings a ``--resume`` must
match (:func:`input_config`), and this invocation's options, device, versions, counts and stage timings
(:func:`run_report`)."""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from gpu_align import __version__
from gpu_align.device import describe
from gpu_align.pipeline.options import RunOptions, StageTimes
from gpu_align.scan import Source
from packer.process import peak_rss_mb


def input_config(opts: RunOptions, source: Source, fingerprint: str | None = None) -> dict[str, Any]:
    """What must not change between a run and its --resume (the writer refuses a mismatch).

    ``fingerprint``: :meth:`Source.fingerprint` (paths, identities, file sizes and mtimes, .lst landmarks), when
    the caller has it already.
    """
    return {
        "command": "run",
        "source": source.root,
        "inputs": len(source.items),
        "fingerprint": fingerprint or source.fingerprint(),
        "shard": list(opts.shard) if opts.shard else None,
        "quality": opts.quality,
        "select": opts.select,
        "min_face_rel": opts.min_face_rel,
        "on_miss": opts.on_miss,
        "detector": opts.detector,
        "min_score": opts.min_score,
        "refine": opts.refine,
        "batch_size": opts.batch_size,
    }


def versions() -> dict[str, str]:
    import cv2

    v = {"gpu-align": __version__, "python": platform.python_version(), "torch": str(torch.__version__)}
    v |= {"numpy": np.__version__, "opencv": cv2.__version__}
    with contextlib.suppress(ImportError):
        import nvidia.dali

        v["dali"] = nvidia.dali.__version__
    return v


def run_report(
    opts: RunOptions,
    device: torch.device,
    decoder: Any,
    source: Source,
    done: int,
    processed: int,
    counts: dict[str, int],
    times: StageTimes,
    t_start: float,
) -> dict[str, Any]:
    """What this invocation adds to report.json (under ``extra``): settings, versions, device, counts, timings."""
    # RunResult.seconds is this same rounded number, and the printed rate is computed from it: summary and report
    # agree to the last digit (a rate from the unrounded time could round the other way)
    seconds = round(time.perf_counter() - t_start, 3)
    return {
        "run": {
            "options": {k: v for k, v in asdict(opts).items() if k not in ("quiet",)},
            "device": describe(device),
            "decoder": repr(decoder) if decoder else None,
            "versions": versions(),
            "scan_skipped": [{"path": p, "reason": r} for p, r in source.skipped],
            "csv": [m.report() for m in source.csv],  # --landmarks-csv / --boxes-csv: rows and photos matched
            "this_invocation": {
                "resumed_at": done,
                "processed": processed,
                **counts,
                "seconds": seconds,
                "images_per_second": round(processed / seconds, 1) if seconds > 0 else None,
                "stage_seconds": {k: round(v, 3) for k, v in asdict(times).items()},
                "peak_rss_mb": peak_rss_mb(),
            },
        }
    }
