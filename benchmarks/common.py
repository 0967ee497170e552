"""What every benchmark script shares: the machine description and the sections of ``benchmarks/RESULTS.md``.

Run the scripts from the repository root as modules, e.g. ``python -m benchmarks.bench_pipeline``.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine(*, load: bool = True) -> str:
    """One line: CPU, cores, GPU, load average, Python and library versions, date."""
    import cv2
    import numpy as np

    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    if gpu := gpu_model():
        parts.append(gpu)
    if load and hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at the end")
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}", f"OpenCV {cv2.__version__}"]
    try:
        import torch

        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    return f"{', '.join(parts)}; {', '.join(versions)}; {datetime.date.today().isoformat()}"


def write_section(title: str, text: str) -> None:
    """Replace the ``## title`` section of RESULTS.md with ``text`` (or append it), leaving the others alone."""
    heading = f"## {title}"
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{text.rstrip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old, count=1)
    else:
        new = old.rstrip() + "\n\n" + section
    RESULTS.write_text(new.rstrip() + "\n", encoding="utf-8")
