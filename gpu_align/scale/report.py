"""The merged ``report.json`` of a Ray run: the merge's report, with every shard's skips and notes folded in.

Why fold them in: ``merge`` only sees stored crops, so on its own it would report nothing of the photos the shards
left out (no face, corrupt files). The merged report reads like an unsharded run's (``counts``, ``skipped``,
``skipped_by_reason``, ``notes`` over all inputs, in input order), and adds ``extra.ray``: the plan, each shard's
attempts and times, each worker's throughput, and every retry with its cause. ``config`` and ``files`` stay the
merge writer's, so a ``--resume`` of the merge still checks what it merged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from gpu_align.scan import Source
from packer.fsutil import atomic_write


def read_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "report.json").read_bytes())


def merged_report(
    merged: dict[str, Any],
    shard_reports: list[dict[str, Any]],
    *,
    source: Source,
    run: dict[str, Any],
    ray: dict[str, Any],
) -> dict[str, Any]:
    """``merged`` (the merge writer's report.json) with the shards' skips, notes and counts, plus ``extra``."""
    out = dict(merged)
    skipped = [e for r in shard_reports for e in r.get("skipped", [])] + list(merged.get("skipped", []))
    notes = [e for r in shard_reports for e in r.get("notes", [])] + list(merged.get("notes", []))
    by_reason: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for r in [*shard_reports, merged]:
        by_reason.update(r.get("skipped_by_reason", {}))
        by_kind.update(r.get("notes_by_kind", {}))
    counts = dict(merged.get("counts", {}))
    counts["inputs"] = sum(int(r["counts"]["inputs"]) for r in shard_reports)
    counts["skipped"] = len(skipped)
    counts["dropped_identities"] = sum(int(r["counts"].get("dropped_identities", 0)) for r in shard_reports)
    out.update(
        counts=counts,
        skipped_by_reason=dict(by_reason.most_common()),
        notes_by_kind=dict(by_kind.most_common()),
        skipped=skipped,
        notes=notes,
    )
    run = dict(run)
    run["scan_skipped"] = [{"path": p, "reason": r} for p, r in source.skipped]
    run["csv"] = [m.report() for m in source.csv]  # --landmarks-csv / --boxes-csv, matched against the whole input
    versions = next((r.get("extra", {}).get("run", {}).get("versions") for r in shard_reports), None)
    if versions:
        run.setdefault("versions", versions)
    out["extra"] = {**(merged.get("extra") or {}), "run": run, "ray": ray}
    return out


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """Replace ``folder/report.json`` atomically, formatted as the writer formats it (indent 2, UTF-8; a path
    that is not valid UTF-8 keeps its bytes as backslash escapes)."""
    data = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
    atomic_write(Path(folder) / "report.json", data)
