"""VGGFace2's face metadata CSVs: ``loose_bb_*.csv`` (``NAME_ID,X,Y,W,H``) and ``loose_landmark_*.csv``
(``NAME_ID,P1X,P1Y,…,P5X,P5Y``), matched to the photos of a run.

Why: VGGFace2 already locates every face. With ``--landmarks-csv`` the listed photos skip detection and are warped
with the file's five points (decode + warp + encode: the fastest path); with ``--boxes-csv`` the detector still
runs, but the face kept is the one that best overlaps the file's box (several people in one photo), and a photo
where no face overlaps it enough is reported (``box not matched``) instead of a heuristic's pick.

``NAME_ID`` is ``n000002/0001_01``: identity folder and file stem. An extension (``0001_01.jpg``) and a leading
folder (``train/n000002/0001_01``) are accepted; without the identity (``0001_01``) a row matches only when that
stem names one photo of the run. Rows are matched to photos by (parent folder, stem) of the photo's path (for an
archive member, of the member's name). A malformed file is refused with ``file:line``; rows whose photo the run
does not have, ambiguous rows and photos without a row are counted and reported (:class:`CsvMatch`).

Point order is checked on load, over the whole file (single rows of profile faces may break any rule): the
ArcFace order is left eye, right eye, nose, left mouth corner, right mouth corner (image left/right), so in most
rows P1 is left of P2, P4 left of P5, the nose below the eyes and the mouth below the nose. A file that breaks one
of these in most rows is refused, naming the rule: its points are in another order.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gpu_align.errors import UserError
from packer.lst import landmark_problem

__all__ = ["CsvMatch", "CsvTable", "apply_csvs", "note_photos_without_row", "read_csv", "write_vggface2_csvs"]

BOX_HEADER = ("NAME_ID", "X", "Y", "W", "H")
LANDMARK_HEADER = ("NAME_ID", *(f"P{i}{a}" for i in range(1, 6) for a in "XY"))
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_EXAMPLES = 5  # rows / photos named in the report per kind


@dataclass
class CsvTable:
    """One CSV read by :func:`read_csv`. ``rows``: NAME_ID key (``identity/stem`` or ``stem``) → values (boxes:
    ``(x1, y1, x2, y2)``; landmarks: ``(5, 2)`` x, y); ``lines``: key → line number; ``bad``: key → why the row's
    landmarks cannot place a face."""

    path: str
    kind: str  # "boxes" | "landmarks"
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)


def _key(name_id: str) -> str:
    """``train/n000002/0001_01.jpg`` → ``n000002/0001_01``; ``0001_01`` stays."""
    parts = [p for p in name_id.strip().replace("\\", "/").split("/") if p]
    if not parts:
        return ""
    stem, ext = os.path.splitext(parts[-1])
    if ext.lower() in _IMAGE_EXTS:
        parts[-1] = stem
    return "/".join(parts[-2:])


def _order_check(path: str, lms: list[np.ndarray]) -> None:
    """Refuse a landmarks file whose points are in another order than the ArcFace one (see the module docstring)."""
    if not lms:
        return
    p = np.stack(lms)  # (N, 5, 2)
    eyes_y = (p[:, 0, 1] + p[:, 1, 1]) / 2
    rules = [
        (p[:, 0, 0] < p[:, 1, 0], "P1 (left eye) left of P2 (right eye)"),
        (p[:, 3, 0] < p[:, 4, 0], "P4 (left mouth corner) left of P5 (right mouth corner)"),
        (p[:, 2, 1] > eyes_y, "P3 (nose) below the eyes P1, P2"),
        ((p[:, 3, 1] + p[:, 4, 1]) / 2 > p[:, 2, 1], "the mouth corners P4, P5 below the nose P3"),
    ]
    for ok, rule in rules:
        share = float(ok.mean())
        if share < 0.5:
            raise UserError(
                f"{path}: the points are not in the expected order: {rule} holds in only {share:.0%} of the rows. "
                "Expected P1..P5 = left eye, right eye, nose, left mouth corner, right mouth corner (image left/"
                "right, as MTCNN and VGGFace2's loose_landmark files give them); reorder the columns"
            )


def read_csv(path: str | os.PathLike, kind: str) -> CsvTable:
    """Read a VGGFace2 ``loose_bb`` (``kind="boxes"``) or ``loose_landmark`` (``kind="landmarks"``) CSV.

    Raises :class:`UserError` with ``file:line`` for a wrong header (also when it is the other kind's file), a
    row with the wrong number of fields or a non-number, a non-positive box size, or a NAME_ID given twice.
    """
    p = os.fspath(path)
    header = BOX_HEADER if kind == "boxes" else LANDMARK_HEADER
    other = ("--landmarks-csv", "loose_landmark") if kind == "boxes" else ("--boxes-csv", "loose_bb")
    table = CsvTable(p, kind)
    lms: list[np.ndarray] = []
    try:
        f = open(p, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    with f:
        reader = csv.reader(f)
        header_seen = False
        try:
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                cells = [c.strip() for c in row]
                if not header_seen:
                    header_seen = True
                    got = tuple(c.upper() for c in cells)
                    if got == header:
                        continue
                    want = ",".join(header)
                    if got == (LANDMARK_HEADER if kind == "boxes" else BOX_HEADER):
                        raise UserError(f"{p}:{line}: this is a {other[1]} file; pass it with {other[0]}")
                    raise UserError(f"{p}:{line}: expected the header {want}, got {','.join(cells)!r}")
                where = f"{p}:{line}"
                if len(cells) != len(header):
                    raise UserError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(cells)}")
                key = _key(cells[0])
                if not key:
                    raise UserError(f"{where}: empty NAME_ID")
                try:
                    values = [float(c) for c in cells[1:]]
                except ValueError:
                    raise UserError(f"{where}: fields after NAME_ID must be numbers, got {cells[1:]}") from None
                if key in table.lines:
                    raise UserError(f"{where}: NAME_ID {cells[0]!r} again (first on line {table.lines[key]})")
                if kind == "boxes":
                    x, y, w, h = values
                    if not all(math.isfinite(v) for v in values) or w <= 0 or h <= 0:
                        raise UserError(f"{where}: box X,Y,W,H = {cells[1:]} needs finite numbers and W, H > 0")
                    table.rows[key] = np.array([x, y, x + w, y + h], np.float32)
                else:
                    pts = np.array(values, np.float32).reshape(5, 2)
                    why = landmark_problem([*pts[:, 0].tolist(), *pts[:, 1].tolist()])
                    if why is not None:
                        table.bad[key] = f"bad landmarks: {why} ({where})"
                    else:
                        lms.append(pts)
                    table.rows[key] = pts
                table.lines[key] = line
        except csv.Error as e:
            raise UserError(f"{p}:{reader.line_num}: not a valid CSV line ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not a UTF-8 text file ({e.reason})") from None
    if not table.lines:
        raise UserError(f"{p}: no rows after the header {','.join(header)}")
    if kind == "landmarks":
        _order_check(p, lms)
    return table


@dataclass
class CsvMatch:
    """How one CSV met the photos of a run (``report.json``'s ``csv`` entry)."""

    path: str
    kind: str
    rows: int = 0
    matched: int = 0
    rows_without_photo: list[str] = field(default_factory=list)  # "NAME_ID (line N)"
    ambiguous_rows: list[str] = field(default_factory=list)
    photos_without_row: list[str] = field(default_factory=list)

    def report(self) -> dict:
        """Counts and the first few of each kind, for report.json."""
        return {
            "file": self.path,
            "kind": self.kind,
            "rows": self.rows,
            "matched": self.matched,
            "rows_without_photo": len(self.rows_without_photo),
            "rows_without_photo_examples": self.rows_without_photo[:_EXAMPLES],
            "ambiguous_rows": len(self.ambiguous_rows),
            "ambiguous_rows_examples": self.ambiguous_rows[:_EXAMPLES],
            "photos_without_row": len(self.photos_without_row),
            "photos_without_row_examples": self.photos_without_row[:_EXAMPLES],
        }

    def summary(self) -> str:
        """One line for the terminal."""
        what = "landmarks (no detection)" if self.kind == "landmarks" else "reference boxes"
        extra = []
        if self.rows_without_photo:
            extra.append(f"{len(self.rows_without_photo):,} rows name no photo of this run")
        if self.ambiguous_rows:
            extra.append(f"{len(self.ambiguous_rows):,} rows without identity match several photos")
        if self.photos_without_row:
            tail = "detected" if self.kind == "landmarks" else "face chosen by --select"
            extra.append(f"{len(self.photos_without_row):,} photos have no row ({tail})")
        more = "; " + "; ".join(extra) + " (report.json)" if extra else ""
        return f"{os.path.basename(self.path)}: {what} for {self.matched:,} of {self.rows:,} rows{more}"


def _photo_key(path: str) -> tuple[str, str]:
    """(parent folder, stem) of a photo path or ``archive::member``."""
    name = path.rpartition("::")[2] if "::" in path else path
    folder, _, base = name.replace("\\", "/").rpartition("/")
    return folder.rpartition("/")[2], os.path.splitext(base)[0]


def _match(table: CsvTable, items: Sequence) -> tuple[dict[int, str], CsvMatch]:
    """Row key per item position, and how the rows and photos met."""
    full: dict[str, int] = {}
    by_stem: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        ident, stem = _photo_key(it.path)
        full.setdefault(f"{ident}/{stem}", k)
        by_stem.setdefault(stem, []).append(k)
    res = CsvMatch(table.path, table.kind, rows=len(table.rows))
    got: dict[int, str] = {}
    for key, line in table.lines.items():
        if "/" in key:
            k = full.get(key)
        else:
            ks = by_stem.get(key, [])
            if len(ks) > 1:
                res.ambiguous_rows.append(f"{key} (line {line}: {len(ks)} photos)")
                continue
            k = ks[0] if ks else None
        if k is None:
            res.rows_without_photo.append(f"{key} (line {line})")
        elif k not in got:
            got[k] = key
    res.matched = len(got)
    return got, res


def apply_csvs(items: list, *, landmarks: str | None = None, boxes: str | None = None) -> tuple[list, list[CsvMatch]]:
    """``items`` (:class:`gpu_align.scan.InputItem`) with the CSVs' metadata: landmarks (and the box, when both
    files have the photo) for photos the landmarks file lists; a reference box (``ref_box``) from the boxes file.
    Items that already carry landmarks (a ``.lst`` line's) keep them. Returns the new items and one
    :class:`CsvMatch` per file."""
    matches: list[CsvMatch] = []
    lm_rows: dict[int, str] = {}
    box_rows: dict[int, str] = {}
    lm_table = box_table = None
    if landmarks:
        lm_table = read_csv(landmarks, "landmarks")
        lm_rows, m = _match(lm_table, items)
        matches.append(m)
    if boxes:
        box_table = read_csv(boxes, "boxes")
        box_rows, m = _match(box_table, items)
        matches.append(m)
    out = []
    for k, it in enumerate(items):
        changes: dict = {}
        if box_table is not None and k in box_rows:
            changes["ref_box"] = tuple(float(v) for v in box_table.rows[box_rows[k]])
        if lm_table is not None and k in lm_rows and it.landmarks is None and it.bad_landmarks is None:
            key = lm_rows[k]
            if key in lm_table.bad:
                changes["bad_landmarks"] = lm_table.bad[key]
            else:
                changes["landmarks"] = lm_table.rows[key].copy()
                if "ref_box" in changes:
                    changes["bbox"] = tuple(round(v) for v in changes["ref_box"])
        out.append(dataclasses.replace(it, **changes) if changes else it)
    return out, matches


def note_photos_without_row(matches: list[CsvMatch], items: Sequence) -> None:
    """Fill :attr:`CsvMatch.photos_without_row` for the photos of this run (after ``--shard`` / ``--limit``)."""
    for m in matches:
        attr = "landmarks" if m.kind == "landmarks" else "ref_box"
        m.photos_without_row = [it.path for it in items if getattr(it, attr, None) is None]


def write_vggface2_csvs(lst_path: str | os.PathLike, boxes_path: str | os.PathLike, landmarks_path: str | os.PathLike,
                        *, name_of=None) -> int:
    """Write ``loose_bb`` / ``loose_landmark`` CSVs from a ``train.lst`` written by ``gpu-align run`` (its
    detected boxes and landmarks): what the demo's ``--as-vggface2`` ships, and how tests compare the CSV paths
    with the detections they came from. ``name_of(path)``: the NAME_ID of a photo (default ``identity/stem``).
    Landmarks keep the ``.lst``'s 1/100 px, so warping with them reproduces the detected crops exactly. Returns the
    number of rows."""
    from packer.lst import read_lst

    if name_of is None:
        def name_of(path: str) -> str:
            return "/".join(_photo_key(path))

    rows = 0
    os.makedirs(os.path.dirname(os.path.abspath(boxes_path)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(landmarks_path)), exist_ok=True)
    with open(boxes_path, "w", newline="") as fb, open(landmarks_path, "w", newline="") as fl:
        wb, wl = csv.writer(fb, lineterminator="\n"), csv.writer(fl, lineterminator="\n")
        wb.writerow(BOX_HEADER)
        wl.writerow(LANDMARK_HEADER)
        for e in read_lst(lst_path):
            if e.landmarks is None or e.bbox is None:
                continue
            name = name_of(e.path)
            x1, y1, x2, y2 = e.bbox
            wb.writerow([name, x1, y1, x2 - x1, y2 - y1])
            xs, ys = e.landmarks[:5], e.landmarks[5:]
            wl.writerow([name, *(f"{v:.2f}".rstrip("0").rstrip(".") for xy in zip(xs, ys, strict=True) for v in xy)])
            rows += 1
    return rows
