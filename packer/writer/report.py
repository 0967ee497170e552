"""``report.json``: what a pack wrote, skipped and noted; and the :class:`WriteSummary` read back from it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packer.writer.names import REPORT_NAME

__all__ = ["WriteSummary", "build_report", "jsonable", "read_finished_report", "report_bytes", "summary_of"]

_REPORT_FORMAT = "gpu-align pack report"


@dataclass
class WriteSummary:
    """Counts of a finished dataset (read back from its ``report.json``)."""

    out_dir: Path
    layout: str
    label_style: str
    num_inputs: int
    num_images: int
    num_classes: int
    num_skipped: int
    dropped_identities: int
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None
    resumed_from: int = 0  # inputs that were already written when this writer opened
    already_finished: bool = False  # resume found the dataset finished: nothing was written


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def report_bytes(obj: Any) -> bytes:
    # Readable UTF-8; file names that are not valid UTF-8 (surrogate escapes) become \udcXX JSON escapes.
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def _skipped(lines: bytes) -> list[dict]:
    out = []
    for line in lines.splitlines():
        s = json.loads(line)
        out.append({"path": s["path"], "reason": s["reason"], "identity": s["group"]})
    return out


def _notes(lines: bytes) -> list[dict]:
    out = []
    for line in lines.splitlines():
        n = json.loads(line)
        out.append({"path": n.pop("path"), "identity": n.pop("group"), **n})
    return out


def build_report(
    *,
    settings: dict[str, Any],
    files: list[str],
    counts: dict[str, int],
    config: dict,
    skipped_lines: bytes,
    notes_lines: bytes,
    extra: dict | None,
) -> dict:
    """The ``report.json`` object.

    ``settings``: ``layout``, ``label_style``, ``image_size``; ``counts``: ``inputs``, ``images``, ``classes``,
    ``dropped_identities`` (``skipped`` is counted from ``skipped_lines``); ``skipped_lines`` / ``notes_lines``:
    the streamed ``skipped.jsonl`` / ``notes.jsonl``; ``extra`` (JSON-able) is stored under ``"extra"``.
    """
    skipped, notes = _skipped(skipped_lines), _notes(notes_lines)
    by_reason = Counter(s["reason"].split(":")[0].strip() for s in skipped)
    report = {
        "format": _REPORT_FORMAT,
        "version": 1,
        "layout": settings["layout"],
        "label_style": settings["label_style"],
        "image_size": list(settings["image_size"]),
        "files": files,
        "counts": {
            "inputs": counts["inputs"],
            "images": counts["images"],
            "classes": counts["classes"],
            "skipped": len(skipped),
            "dropped_identities": counts["dropped_identities"],
        },
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "notes_by_kind": dict(sorted(Counter(n["kind"] for n in notes).items())),
        "config": config,
        "skipped": skipped,
        "notes": notes,
    }
    if extra:
        report["extra"] = jsonable(extra)
    return report


def read_finished_report(out_dir: Path) -> dict | None:
    """The ``report.json`` of a finished pack in ``out_dir`` (all its files present), else None."""
    try:
        report = json.loads((out_dir / REPORT_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("format") != _REPORT_FORMAT:
        return None
    if not all((out_dir / name).is_file() for name in report.get("files", [])):
        return None
    return report


def summary_of(report: dict, out_dir: Path, *, resumed_from: int, already_finished: bool) -> WriteSummary:
    counts = report["counts"]
    return WriteSummary(
        out_dir=out_dir,
        layout=report["layout"],
        label_style=report["label_style"],
        num_inputs=counts["inputs"],
        num_images=counts["images"],
        num_classes=counts["classes"],
        num_skipped=counts["skipped"],
        dropped_identities=counts["dropped_identities"],
        skipped_by_reason=report["skipped_by_reason"],
        report_path=out_dir / REPORT_NAME,
        resumed_from=resumed_from,
        already_finished=already_finished,
    )
