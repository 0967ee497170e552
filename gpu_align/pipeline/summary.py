"""The table ``gpu-align run`` prints at the end: what went in, what came out, where the time went."""

from __future__ import annotations

import os
from typing import TextIO

from gpu_align.pipeline.options import RunResult

__all__ = ["print_summary"]


def _size(path: str) -> str:
    try:
        n = float(os.path.getsize(path))
    except OSError:
        return "missing"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def print_summary(result: RunResult, file: TextIO, command: str = "run") -> None:
    """Print the final summary of a run (dataset totals from ``report.json``, timings of this invocation).

    ``command``: what the user ran (``run``, or ``pack`` of a photo ``.lst``), named in the header line.
    """
    rep = result.report
    counts = rep.get("counts", {})
    by_reason = rep.get("skipped_by_reason", {})
    rate = result.images_per_second
    out = str(result.out_dir)
    rows = [
        ("photos", f"{counts.get('inputs', result.inputs):,}"),
        ("stored faces", f"{counts.get('images', 0):,}"),
        ("identities", f"{counts.get('classes', 0):,}"),
    ]
    if counts.get("dropped_identities"):
        rows.append(("dropped identities", f"{counts['dropped_identities']:,} (too few images)"))
    if result.center:
        why = "no face: the photo's centre, from --on-miss center or a .lst line of one"
        rows.append(("centre crops", f"{result.center:,} ({why})"))
    if counts.get("skipped"):
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        rows.append(("skipped", f"{counts['skipped']:,} ({detail}); see report.json"))
    multi = rep.get("notes_by_kind", {}).get("multi-face", 0)
    if multi:
        rows.append(("multi-face photos", f"{multi:,} (several confident faces; choice + runner-up in report.json)"))
    scan_skipped = rep.get("extra", {}).get("run", {}).get("scan_skipped", [])
    if scan_skipped:
        rows.append(("not photos", f"{len(scan_skipped):,} files left out by the scan; see report.json"))
    t = result.times
    p = result.packer
    stages = (
        f"decode {t.decode:.1f} · detect {t.detect:.1f} · "
        + (f"refine {t.refine:.1f} · " if t.refine >= 0.05 else "")
        + f"warp {t.warp:.1f} · "
        f"to host {t.transfer:.1f} · "
        f"encode {p.get('encode_s', 0):.1f} · write {p.get('write_s', 0):.1f}"
    )
    resumed = rep.get("extra", {}).get("run", {}).get("this_invocation", {}).get("resumed_at", 0)
    this_run = f"{result.processed:,} photos in {result.seconds:.1f} s, {rate:,.1f} img/s"
    if resumed:
        this_run += f" (resumed at {resumed:,})"
    rows += [("this run", this_run), ("stage seconds", stages)]
    rows.append(
        (
            "outputs",
            f"{os.path.join(out, 'train.rec')} ({_size(os.path.join(out, 'train.rec'))}), "
            "train.idx, train.lst, property, report.json, report.html",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"gpu-align {command}: done", file=file)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=file)
