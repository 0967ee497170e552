"""face2rec2-style ``.lst`` files: one tab-separated line per image, read and written exactly as InsightFace does.

Line format (``face_preprocess.parse_lst_line`` in InsightFace)::

    aligned <TAB> path <TAB> label [<TAB> x1 <TAB> y1 <TAB> x2 <TAB> y2 [<TAB> lx1 .. lx5 <TAB> ly1 .. ly5]]

``aligned`` is 1 for an aligned crop (stored as-is) and 0 for a photo that needs detection and alignment. The
optional box is parsed by face2rec2 with ``int()``, so it is written as integers; the ten landmark numbers are all
x first, then all y (eyeL eyeR nose mouthL mouthR) and are parsed with ``float()``.

mxnet's *im2rec* ``.lst`` (``index <TAB> label <TAB> path``) is a different format; :func:`read_lst` recognises it
and says how to convert it.

Landmarks that parse as numbers but cannot place a face are not a format error: the line is read with
``bad_landmarks`` set (and no box/landmarks) so that ``run``/``pack`` skip it and report ``bad landmarks: ...``
instead of storing a black crop. Bad means not finite in float32 (``nan``, ``inf``, ``1e39``; the box too), eyes
on one point (inter-ocular distance under 1 px) or all five points on one line (:func:`landmark_problem`). Points
more than one inter-ocular distance outside the photo are bad too, checked once the photo's size is known
(:func:`landmarks_outside`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

from packer.errors import UserError

__all__ = ["LstEntry", "format_lst_line", "landmark_problem", "landmarks_outside", "read_lst", "unlistable"]

FLOAT32_MAX = 3.4028234663852886e38  # larger magnitudes become inf in float32 (where the fit and the warp run)
MIN_IOD = 1.0  # px: eyes closer than this are "on one point"
COLLINEAR = 0.02  # the five points' second principal spread below 2 % of the first: all on one line

# Paths are arbitrary bytes on Linux: surrogateescape round-trips any file name through str and back.
LST_ENCODING = "utf-8"
LST_ERRORS = "surrogateescape"


@dataclass(frozen=True, slots=True)
class LstEntry:
    """One ``.lst`` line.

    Attributes:
        aligned: 1 if ``path`` is an aligned crop (stored as-is); 0 if it needs detection/alignment.
        path: image path as written in the file (absolute, or relative to the ``.lst``'s directory / ``--root``).
        label: identity label (an int; only its grouping matters when packing, labels are reassigned 0..C-1).
        bbox: face box ``(x1, y1, x2, y2)`` in pixels, integers (face2rec2 parses them with ``int()``).
        landmarks: 10 floats, ``x1..x5`` then ``y1..y5`` (eyeL eyeR nose mouthL mouthR); needs ``bbox``.
        bad_landmarks: why the line's box/landmarks cannot be used (then both are None); the line is skipped.
    """

    aligned: int
    path: str
    label: int
    bbox: tuple[int, int, int, int] | None = None
    landmarks: tuple[float, ...] | None = None
    bad_landmarks: str | None = None

    def with_label(self, label: int) -> LstEntry:
        return replace(self, label=label)

    def with_path(self, path: str) -> LstEntry:
        return replace(self, path=path)


def _fmt_float(v: float) -> str:
    """Compact fixed-point (``%.2f`` without trailing zeros): ``38.29``, ``40``, ``-0.5``."""
    s = f"{float(v):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _finite32(values: tuple[float, ...]) -> bool:
    return all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values)


def landmark_problem(landmarks: tuple[float, ...] | list[float]) -> str | None:
    """Why 10 landmark numbers (``x1..x5 y1..y5``) cannot place a face, or None: not finite in float32, eyes on
    one point, or all five points on one line. Photo bounds are :func:`landmarks_outside`'s job."""
    if len(landmarks) != 10:
        return f"{len(landmarks)} numbers, expected 10"
    if not _finite32(tuple(landmarks)):
        return "not finite in float32 (nan, inf or beyond ±3.4e38)"
    xs, ys = landmarks[:5], landmarks[5:]
    iod = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
    if iod < MIN_IOD:
        return f"eyes on one point (inter-ocular distance {iod:.2f} px)"
    # principal spreads of the point cloud: the eigenvalues of its 2x2 covariance
    mx, my = sum(xs) / 5, sum(ys) / 5
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    half_tr, det = (sxx + syy) / 2, sxx * syy - sxy * sxy
    root = math.sqrt(max(half_tr * half_tr - det, 0.0))
    big, small = half_tr + root, max(half_tr - root, 0.0)
    if math.sqrt(small) < COLLINEAR * math.sqrt(big):
        return "all five points on one line"
    return None


def landmarks_outside(landmarks: tuple[float, ...] | list[float], width: int, height: int) -> str | None:
    """Why landmarks do not fit a ``width``×``height`` photo, or None.

    A point may lie outside the photo by up to one inter-ocular distance (a face cut by the photo's edge still
    gives a usable crop); farther out the crop would be mostly black.
    """
    xs, ys = landmarks[:5], landmarks[5:]
    m = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
    for name, x, y in zip(("left eye", "right eye", "nose", "left mouth", "right mouth"), xs, ys, strict=True):
        if not (-m <= x <= width + m and -m <= y <= height + m):
            return (
                f"{name} at ({x:.1f}, {y:.1f}) is more than one inter-ocular distance ({m:.1f} px) outside the "
                f"{width}x{height} photo"
            )
    return None


def unlistable(path: str) -> bool:
    """Whether a tab-separated ``.lst`` line cannot hold ``path`` (it has a tab, a newline or a carriage return)."""
    return any(c in path for c in "\t\n\r")


def format_lst_line(e: LstEntry) -> str:
    """The tab-separated ``.lst`` line of ``e``, without the newline.

    Raises ValueError for what a line cannot hold (a tab or newline in the path, landmarks without a box, a box or
    landmarks that are not finite in float32: a ``train.lst`` never holds ``inf``/``nan``).
    """
    if unlistable(e.path) or not e.path:
        raise ValueError(f"path {e.path!r} cannot be written to a .lst line (empty, or holds a tab or newline)")
    fields = [str(int(e.aligned)), e.path, str(int(e.label))]
    if e.bbox is not None:
        if len(e.bbox) != 4:
            raise ValueError(f"bbox must have 4 numbers, got {len(e.bbox)}")
        if not _finite32(tuple(e.bbox)):
            raise ValueError(f"bbox {e.bbox} is not finite in float32")
        fields += [str(round(v)) for v in e.bbox]  # face2rec2 reads the box with int(): never write "12.5"
    if e.landmarks is not None:
        if e.bbox is None:
            raise ValueError("landmarks need a bbox (face2rec2 reads landmarks from fields 8-17)")
        if len(e.landmarks) != 10:
            raise ValueError(f"landmarks must be 10 numbers (x1..x5 y1..y5), got {len(e.landmarks)}")
        if not _finite32(tuple(e.landmarks)):
            raise ValueError(f"landmarks {e.landmarks} are not finite in float32")
        fields += [_fmt_float(v) for v in e.landmarks]
    return "\t".join(fields)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _im2rec_hint(where: str, path: str) -> str:
    return (
        f"{where}: this is an mxnet im2rec .lst line ('index<TAB>label<TAB>path'), not face2rec2's "
        "('aligned<TAB>path<TAB>label', as InsightFace and `gpu-align lst` write). Convert it with: "
        f"awk -F'\\t' -v OFS='\\t' '{{print 1, $NF, int($2)}}' {path} > face2rec2.lst "
        "(1 = aligned crops; use 0 for photos that still need alignment)"
    )


def _parse_line(fields: list[str], where: str, path: str) -> LstEntry:
    n = len(fields)
    # im2rec: index, one or more numeric labels, path last. face2rec2's last field is a number (label, box or
    # landmark) and its second field a path, so the two cannot be confused.
    if n >= 3 and not _is_number(fields[-1]) and all(_is_number(f) for f in fields[:-1]):
        raise UserError(_im2rec_hint(where, path))
    if n not in (3, 7, 17):
        raise UserError(
            f"{where}: expected 3, 7 or 17 tab-separated fields (aligned, path, label [, x1 y1 x2 y2 "
            f"[, 5 landmark x, 5 landmark y]]), got {n}"
        )
    aligned_s, img_path, label_s = fields[:3]
    if aligned_s.strip() not in ("0", "1"):
        raise UserError(f"{where}: first field (aligned) must be 0 or 1, got {aligned_s!r}")
    if not img_path:
        raise UserError(f"{where}: empty image path (second field)")
    if not _is_int(label_s):
        raise UserError(f"{where}: third field (label) must be an integer, got {label_s!r}")
    bbox = landmarks = None
    bad = None
    if n >= 7:
        try:
            box = tuple(float(v) for v in fields[3:7])  # face2rec2 needs integers; "12.5" (rounded) is accepted
        except ValueError:
            raise UserError(f"{where}: fields 4-7 (face box x1 y1 x2 y2) must be numbers, got {fields[3:7]}") from None
        if _finite32(box):
            bbox = tuple(round(v) for v in box)
        else:
            bad = f"face box {fields[3:7]} not finite in float32"
    if n == 17:
        try:
            landmarks = tuple(float(v) for v in fields[7:17])
        except ValueError:
            raise UserError(f"{where}: fields 8-17 (landmarks x1..x5 y1..y5) must be numbers") from None
        bad = bad or landmark_problem(landmarks)
    if bad is not None:  # numbers, but no face can be placed with them: the line is skipped and reported
        return LstEntry(int(aligned_s), img_path, int(label_s), bad_landmarks=f"bad landmarks: {bad}")
    return LstEntry(int(aligned_s), img_path, int(label_s), bbox, landmarks)


def read_lst(path: str | os.PathLike, *, require_grouped: bool = True) -> Iterator[LstEntry]:
    """Parse a face2rec2 ``.lst`` file line by line.

    Blank lines are skipped. Every problem is a :class:`UserError` naming ``file:line``: malformed fields, an
    im2rec-format line (with a conversion command), and, with ``require_grouped``, a label whose lines are not
    consecutive (InsightFace's identity records need each identity's images together).
    """
    p = os.fspath(path)
    try:
        f = open(p, encoding=LST_ENCODING, errors=LST_ERRORS, newline="\n")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise UserError(f"{p}: no such .lst file") from None
    except IsADirectoryError:
        raise UserError(f"{p} is a directory; make a .lst of it first: gpu-align lst {p} -o train.lst") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    cur_label: int | None = None
    cur_first = 0
    last_line = 0
    seen: dict[int, tuple[int, int]] = {}  # label -> (first line, last line), for the grouping error
    with f:
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\n").rstrip("\r")
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark from Windows editors
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                fields = line.strip().split("\t")
                if len(fields) < 3 and len(line.split()) >= 3:
                    raise UserError(f"{where}: fields must be separated by TABs, not spaces: {line.strip()!r}")
                entry = _parse_line(fields, where, p)
                if require_grouped and entry.label != cur_label:
                    if cur_label is not None:
                        seen[cur_label] = (cur_first, last_line)
                    if entry.label in seen:
                        first, last = seen[entry.label]
                        raise UserError(
                            f"{where}: label {entry.label} appears again; its images were on lines {first}-{last} "
                            f"and label {cur_label} came in between (lines {cur_first}-{last_line}). Each identity's "
                            "lines must be consecutive: sort the file by label, e.g. "
                            f"sort -s -t$'\\t' -k3,3n {p} > sorted.lst"
                        )
                    cur_label, cur_first = entry.label, lineno
                last_line = lineno
                yield entry
        except OSError as e:
            raise UserError(f"{p}: read error ({e.strerror})") from None
