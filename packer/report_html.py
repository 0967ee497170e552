"""``report.html``: a self-contained page beside ``report.json`` to see in a minute what a run kept and dropped.

It shows the counts, throughput and stage times, a strip of aligned crops per identity read back from
``train.rec``, every skipped photo (a thumbnail of the source photo when it still decodes, else a placeholder)
with its reason, and the multi-face photos with the chosen face (green) and the runner-up (orange) boxed.

Self-contained so that it opens offline, mailed or copied off a cluster: inline CSS, every image a base64
``data:`` URI, no scripts, fonts or links to anything outside the file. Bounded: at most ``max_identities``
identity strips, ``max_thumbs`` skipped-photo and ``max_thumbs // 2`` multi-face thumbnails (the rest listed as
text, up to ``max_rows``), small JPEGs, and source photos are only read when they are regular files of sane size
(a FIFO in the report never blocks us).
Torch-free, like the rest of ``packer``.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from packer.fsutil import atomic_write
from packer.reader import DatasetReader, decode_image, label_of

__all__ = ["REPORT_HTML_NAME", "write_report_html", "write_report_html_or_warn"]

REPORT_HTML_NAME = "report.html"
_MAX_SOURCE_BYTES = 64 << 20  # larger source files get a placeholder instead of a thumbnail
_MAX_LST_BYTES = 64 << 20  # identity names come from train.lst only when it is small enough to read quickly
_FLAT_LABEL_SCAN = 50_000  # flat layout: identities are found in the first records' headers only
_CHOSEN, _RUNNER_UP = (40, 200, 60), (255, 140, 0)

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-bottom:16px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px;width:min-content}
.card .cap{font-size:12px;color:#444;word-break:break-all;margin-top:4px;min-width:120px}
.card .why{font-size:12px;color:#a00;margin-top:2px;word-break:break-word}
.ph{width:96px;height:96px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#ddd 8px,#ddd 16px);
display:flex;align-items:center;justify-content:center;color:#777;font-size:11px;text-align:center}
.ident{display:flex;align-items:center;gap:10px;margin:3px 0}
.ident .cap{font-size:12px;width:220px;word-break:break-all}
.key span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
.more{color:#666;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:0 48px}
img{display:block}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _jpeg_uri(img: np.ndarray, quality: int = 85) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, w: int, h: int) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}" width="{w}" height="{h}">'


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (max(1, w), max(1, h)), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------ source thumbnails


def _resolve_source(path: str, bases: list[Path]) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for base in bases:
        if (base / p).exists():
            return base / p
    return p


def _thumbnail(
    path: Path, size: int, boxes: list[tuple[list[float], tuple[int, int, int]]] = ()
) -> tuple[np.ndarray | None, str]:
    """``(thumbnail, "")`` of a source photo as displayed (EXIF applied), with ``boxes`` drawn; ``(None, why)``.

    Boxes are in the displayed photo's pixels, as the pipeline reports them.
    """
    from PIL import Image, ImageOps

    try:
        st = os.stat(path)
    except OSError as e:
        return None, e.strerror or "cannot read"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size > _MAX_SOURCE_BYTES:
        return None, f"{st.st_size >> 20} MB: too large to preview"
    if st.st_size == 0:
        return None, "empty file"
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            full_w, full_h = im.size
            if orientation in (5, 6, 7, 8):
                full_w, full_h = full_h, full_w
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at 1/2..1/8 scale, much faster for big photos
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            img = np.array(im)
    except Exception as e:  # any decoder failure (truncated, corrupt, bomb): a placeholder, never an abort
        return None, f"does not decode ({type(e).__name__})"
    if boxes:
        import cv2

        sx, sy = img.shape[1] / full_w, img.shape[0] / full_h
        for box, colour in boxes:
            x1, y1, x2, y2 = (float(v) for v in box[:4])
            p1 = (round(x1 * sx), round(y1 * sy))
            p2 = (round(x2 * sx), round(y2 * sy))
            cv2.rectangle(img, p1, p2, colour, 2, lineType=cv2.LINE_AA)
    return img, ""


def _placeholder(why: str) -> str:
    return f'<div class="ph">{_e(why)}</div>'


# ------------------------------------------------------------------------------------------ identity strips


def _identity_names(out: Path, layout: str) -> dict[int, str]:
    """label -> identity folder name, from ``train.lst`` (the source photo's parent folder)."""
    lst = out / "train.lst"
    names: dict[int, str] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        if lst.stat().st_size > _MAX_LST_BYTES:
            return names
        with open(lst, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                label = int(float(fields[2]))
                if label not in names:
                    names[label] = Path(fields[1]).parent.name
    return names


def _identity_keys(reader: DatasetReader) -> tuple[dict[int, list[int]], str]:
    """label -> image keys, and a note on how complete that is."""
    ranges = reader.identity_ranges()
    if ranges is not None:
        return {label: list(range(a, b)) for label, (a, b) in enumerate(ranges)}, ""
    keys = reader.image_keys()
    note = ""
    if len(keys) > _FLAT_LABEL_SCAN:
        note = f"flat layout: identities found in the first {_FLAT_LABEL_SCAN:,} of {len(keys):,} records"
        keys = keys[:_FLAT_LABEL_SCAN]
    by_label: dict[int, list[int]] = {}
    for key in keys:
        with contextlib.suppress(Exception):  # headers only: the bodies are not needed to group
            by_label.setdefault(label_of(reader.read_header(key)), []).append(key)
    return dict(sorted(by_label.items())), note


def _strip(reader: DatasetReader, keys: list[int], per_identity: int, cell: int) -> np.ndarray | None:
    if len(keys) > per_identity:  # evenly spread over the identity's records
        keys = [keys[round(i * (len(keys) - 1) / max(per_identity - 1, 1))] for i in range(per_identity)]
    tiles = []
    for key in dict.fromkeys(keys):
        try:
            img = decode_image(reader.read(key).body)
        except Exception:  # a damaged record: a grey tile, the rest of the strip still shows
            img = np.full((cell, cell, 3), 200, np.uint8)
        tiles.append(_resize(img, round(img.shape[1] * cell / img.shape[0]), cell))
    if not tiles:
        return None
    gap = np.full((cell, 2, 3), 255, np.uint8)
    return np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)


def _identities_section(out: Path, max_identities: int, per_identity: int, cell: int) -> tuple[str, dict[str, Any]]:
    facts: dict[str, Any] = {}
    if not (out / "train.rec").is_file() or not (out / "train.idx").is_file():
        return "<p class=more>no train.rec/train.idx in this folder</p>", facts
    parts = []
    try:
        with DatasetReader(out) as reader:
            by_label, note = _identity_keys(reader)
            names = _identity_names(out, reader.layout)
            labels = sorted(by_label)
            facts["identities"] = len(labels)
            if len(labels) > max_identities:  # evenly spaced labels: a sample of the whole dataset
                labels = sorted(
                    {labels[round(i * (len(labels) - 1) / max(max_identities - 1, 1))] for i in range(max_identities)}
                )
                note = "; ".join(
                    x
                    for x in (note, f"{len(labels)} of {facts['identities']} identities shown, evenly spaced labels")
                    if x
                )
            if note:
                parts.append(f"<p class=more>{_e(note)}</p>")
            for label in labels:
                keys = by_label[label]
                strip = _strip(reader, keys, per_identity, cell)
                name = names.get(label, "")
                cap = f"<b>{_e(label)}</b> {_e(name)}<br>{len(keys)} image{'s' * (len(keys) != 1)}"
                pic = (
                    _img(_jpeg_uri(strip), f"identity {label}", strip.shape[1], strip.shape[0])
                    if strip is not None
                    else ""
                )
                parts.append(f'<div class="ident"><div class="cap">{cap}</div>{pic}</div>')
    except Exception as e:  # a damaged dataset still gets the rest of its report
        parts.append(f"<p class=more>could not read the dataset: {_e(e)}</p>")
    return "\n".join(parts), facts


# ------------------------------------------------------------------------------------------ page


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = []
    for k, v in rows:
        cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        cells.append(f"<tr><th>{_e(k)}</th><td{cls}>{_e(v)}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _gallery(
    entries: list[dict[str, Any]],
    bases: list[Path],
    budget: list[int],
    max_rows: int,
    size: int,
    caption: Any,
    boxes: Any = None,
) -> str:
    cards, rows = [], []
    for i, entry in enumerate(entries):
        path = str(entry.get("path", ""))
        if budget[0] > 0:
            budget[0] -= 1
            img, why = _thumbnail(_resolve_source(path, bases), size, boxes(entry) if boxes else [])
            pic = _img(_jpeg_uri(img, 80), path, img.shape[1], img.shape[0]) if img is not None else _placeholder(why)
            short = "/".join(Path(path).parts[-2:])  # identity/file; the full path is the tooltip
            cards.append(
                f'<div class="card" title="{_e(path)}">{pic}<div class="cap">{_e(short)}</div>{caption(entry)}</div>'
            )
        elif len(rows) < max_rows:
            rows.append(f"<tr><td>{_e(path)}</td><td>{caption(entry, text=True)}</td></tr>")
        else:
            rows.append(f'<tr><td colspan=2 class="more">… and {len(entries) - i} more in report.json</td></tr>')
            break
    html_ = f'<div class="cards">{"".join(cards)}</div>'
    if rows:
        html_ += f"<p class=more>{len(entries) - len(cards)} more without thumbnails:</p><table>{''.join(rows)}</table>"
    return html_


def _skip_caption(entry: dict[str, Any], text: bool = False) -> str:
    reason = _e(entry.get("reason", ""))
    return reason if text else f'<div class="why">{reason}</div>'


def _note_caption(entry: dict[str, Any], text: bool = False) -> str:
    chosen, runner = entry.get("chosen") or {}, entry.get("runner_up") or {}
    s = f"{entry.get('faces', '?')} faces, {entry.get('select', '')}: chosen p={chosen.get('score', '?')}"
    if runner:
        s += f", runner-up p={runner.get('score', '?')}"
    return _e(s) if text else f'<div class="cap">{_e(s)}</div>'


def _note_boxes(entry: dict[str, Any]) -> list[tuple[list[float], tuple[int, int, int]]]:
    out = []
    for key, colour in (("runner_up", _RUNNER_UP), ("chosen", _CHOSEN)):  # chosen drawn last, on top
        box = (entry.get(key) or {}).get("box")
        if isinstance(box, list) and len(box) >= 4:
            out.append((box, colour))
    return out


def render_report_html(
    out_dir: str | os.PathLike,
    *,
    max_thumbs: int = 200,
    max_rows: int = 2000,
    max_identities: int = 200,
    per_identity: int = 8,
    thumb: int = 96,
    cell: int = 72,
) -> str:
    """The page for ``out_dir`` (see the module docstring), as a string."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    counts = report.get("counts", {})
    extra = report.get("extra") or {}
    run = extra.get("run") or {}
    inv = run.get("this_invocation") or {}
    config_in = (report.get("config") or {}).get("input") or {}
    bases = [Path(x) for x in (config_in.get("root"), config_in.get("source")) if isinstance(x, str)] + [out]

    title = f"gpu-align report: {out.resolve()}"
    body = [f"<h1>{_e(title)}</h1>"]
    sub = [f"{report.get('layout', '?')} layout", f"{report.get('label_style', '?')} labels"]
    if report.get("image_size"):
        sub.append("×".join(str(x) for x in report["image_size"]) + " crops")
    if run.get("device"):
        sub.append(f"device {run['device']}")
    if config_in.get("command"):
        sub.append(f"gpu-align {config_in['command']} {config_in.get('source') or ''}".strip())
    body.append(f'<div class="sub">{_e(" · ".join(sub))}</div>')

    rows: list[tuple[str, Any]] = [
        ("inputs", counts.get("inputs", "?")),
        ("stored faces", counts.get("images", "?")),
        ("identities", counts.get("classes", "?")),
        ("skipped", counts.get("skipped", "?")),
        ("dropped identities", counts.get("dropped_identities", 0)),
    ]
    rows += [(f"skipped: {k}", v) for k, v in (report.get("skipped_by_reason") or {}).items()]
    rows += [(f"noted: {k}", v) for k, v in (report.get("notes_by_kind") or {}).items()]
    if run.get("scan_skipped"):
        rows.append(("left out by the scan", len(run["scan_skipped"])))
    tables = ["<div><h2>Counts</h2>" + _table(rows) + "</div>"]

    speed: list[tuple[str, Any]] = []
    if inv:
        if inv.get("seconds") is not None:
            speed.append(("seconds (this invocation)", inv["seconds"]))
        if inv.get("images_per_second") is not None:
            speed.append(("photos per second", inv["images_per_second"]))
        if inv.get("resumed_at"):
            speed.append(("resumed at input", inv["resumed_at"]))
        if inv.get("peak_rss_mb") is not None:
            speed.append(("peak memory, aligner (MB)", inv["peak_rss_mb"]))
        speed += [(f"stage: {k} (s)", v) for k, v in (inv.get("stage_seconds") or {}).items()]
    packer_stats = extra.get("packer") or {}
    speed += [(f"packer: {k}", v) for k, v in packer_stats.items() if isinstance(v, (int, float))]
    if speed:
        tables.append("<div><h2>Throughput and stage times</h2>" + _table(speed) + "</div>")
    body.append(f'<div class="row">{"".join(tables)}</div>')

    # What was dropped first: that is what the page is for. Multi-face photos get their own, smaller budget, so
    # that many skips never hide them.
    budget = [max_thumbs]
    skipped = report.get("skipped") or []
    body.append(f"<h2>Skipped photos ({len(skipped)})</h2>")
    body.append(
        _gallery(skipped, bases, budget, max_rows, thumb, _skip_caption) if skipped else "<p>none: every photo kept</p>"
    )

    notes = [n for n in report.get("notes") or [] if n.get("kind") == "multi-face"]
    body.append(f"<h2>Photos with several faces ({len(notes)})</h2>")
    if notes:
        body.append(
            f'<p class="key">box drawn:<span style="background:rgb{_CHOSEN}"></span>chosen'
            f'<span style="background:rgb{_RUNNER_UP}"></span>runner-up</p>'
        )
        budget = [max(max_thumbs // 2, 1)]
        body.append(_gallery(notes, bases, budget, max_rows, max(thumb, 240), _note_caption, _note_boxes))
    else:
        body.append("<p>none</p>")

    idents, _facts = _identities_section(out, max_identities, per_identity, cell)
    body.append(f"<h2>Identities: sample crops read back from train.rec</h2>{idents}")

    scan_skipped = run.get("scan_skipped") or []
    if scan_skipped:
        body.append(f"<h2>Left out by the scan ({len(scan_skipped)})</h2>")
        rows_ = []
        for i, s in enumerate(scan_skipped):
            if i == max_rows:
                rows_.append(
                    f'<tr><td colspan=2 class="more">… and {len(scan_skipped) - i} more in report.json</td></tr>'
                )
                break
            path, reason = (s[0], s[1]) if isinstance(s, (list, tuple)) else (s.get("path"), s.get("reason"))
            rows_.append(f"<tr><td>{_e(path)}</td><td>{_e(reason)}</td></tr>")
        body.append(f"<table>{''.join(rows_)}</table>")
    body.append(f'<p class="more">written by gpu-align in {time.perf_counter() - t0:.1f} s from report.json</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report_html(out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/report.json`` and ``train.rec`` atomically; returns its path.

    Damaged or missing photos and records become placeholders; only a missing/unreadable report.json or a failed
    write raise (OSError, ValueError).
    """
    out = Path(out_dir)
    page = render_report_html(out, **kwargs)
    path = out / REPORT_HTML_NAME
    atomic_write(path, page.encode("utf-8", "backslashreplace"), sync=False)  # non-UTF-8 file names, as report.json
    return path


def write_report_html_or_warn(out_dir: str | os.PathLike) -> Path | None:
    """:func:`write_report_html` after a finished ``run``/``pack``: the dataset is complete whatever happens here,
    so a failure is one warning line on stderr, never an error."""
    try:
        return write_report_html(out_dir)
    except (OSError, ValueError) as e:
        print(f"gpu-align: warning: {Path(out_dir) / REPORT_HTML_NAME} not written: {e}", file=sys.stderr)
        return None
