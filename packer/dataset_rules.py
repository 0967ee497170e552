"""The layout and label-style rules of a RecordIO face dataset, in one place: what ``reader`` reads, ``verify``
checks and ``reindex`` rebuilds by.

- A *meta record* (key 0, identity records) has a label list (flag >= 2) and no body.
- The *insightface* layout's header is key 0: a meta record labelled ``[N+1, N+1+K]`` (N >= 0 images, K >= 0
  identities, integers). Image keys are then ``1..N``, identity keys ``N+1..N+K``. Without such a key 0 the
  dataset is *flat*: every record is an image.
- An image's class is its scalar label (flag 0) or the first of its label list (flag >= 1); the *label style* of
  a dataset is ``scalar``, ``pair`` (lists, face2rec2's ``[class, aligned]``), ``mixed`` or ``none``.

The predicates take scalars or numpy arrays (``verify`` runs them over every record at once).
"""

from __future__ import annotations

import numpy as np

from packer.recordio import IRHeader

__all__ = [
    "header_labels",
    "insightface_key_ranges",
    "is_header_record",
    "is_meta_record",
    "label_of",
    "meta_label_ok",
    "style_of_flags",
]


def is_meta_record(flag, body_len):
    """A meta record (key 0 or an identity record): flag >= 2 (a label list) and no body. Scalars or arrays."""
    return (np.asarray(flag) >= 2) & (np.asarray(body_len) == 0)


def meta_label_ok(first, end):
    """Key 0's label ``[N+1, N+1+K]`` is valid: integers with N >= 0, K >= 0. Scalars or arrays."""
    a, b = np.asarray(first, np.float64), np.asarray(end, np.float64)
    with np.errstate(invalid="ignore"):
        return (a >= 1) & (b >= a) & (a == np.floor(a)) & (b == np.floor(b))


def is_header_record(header: IRHeader, body_len: int) -> bool:
    """Key 0 of the insightface layout: a meta record whose label is ``[N+1, N+1+K]`` with N >= 0, K >= 0."""
    if not is_meta_record(header.flag, body_len):
        return False
    return bool(meta_label_ok(header.label[0], header.label[1]))


def insightface_key_ranges(first, end) -> tuple[range, range]:
    """Image keys ``1..N`` and identity keys ``N+1..N+K`` from key 0's label ``[first, end) = [N+1, N+1+K]``."""
    first, end = int(first), int(end)
    return range(1, first), range(first, end)


def header_labels(header: IRHeader) -> tuple[float, float]:
    """``(first label, second label or NaN)`` of a header: the class of an image (see :func:`label_of`), the
    ``[start, end)`` of a meta record (the second only where the flag says there are two or more)."""
    if header.flag == 0:
        return float(header.label), np.nan
    return float(header.label[0]), float(header.label[1]) if header.flag > 1 else np.nan


def label_of(header: IRHeader) -> int:
    """The integer class of an image header: the scalar label (flag 0) or the first label of a list (flag >= 1)."""
    label = header.label if header.flag == 0 else header.label[0]
    return int(label)


def style_of_flags(flags: np.ndarray) -> str:
    """Label style of image records from their flags: ``scalar`` (0), ``pair`` (lists), ``mixed``, ``none``."""
    if flags.size == 0:
        return "none"
    scalar = bool((flags == 0).any())
    listed = bool((flags > 0).any())
    return "mixed" if scalar and listed else ("scalar" if scalar else "pair")
