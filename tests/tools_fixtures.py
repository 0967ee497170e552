"""Builders of real RecordIO face datasets on disk for the dataset-tool tests (reader, unpack, inspect, verify...).

Written directly with ``packer.recordio`` (not with the DatasetWriter under test elsewhere), in the exact layouts
of DESIGN.md:

- ``face2rec2``: images keys 1..N (header id = key), then key 0 (flag 2, ``[N+1, N+1+K]``), then identity records
  N+1..N+K with ``[start, end)``; labels ``[class, 1.0]`` (pair) or scalar.
- ``released``: InsightFace's released / dataset_merge order: key 0 first, then each identity record followed by
  its images; scalar labels.
- ``flat``: keys 0..N-1, scalar labels, no meta records (optionally shuffled).

Images are JPEG (quality 95) 112×112 crops of real shipped photos, one photo per identity.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np

from gpu_align.demo import photos
from packer.recordio import IRHeader, MXIndexedRecordIO, pack

# identity name -> photo it is cut from
IDENTITIES = ("tom_hanks", "astronaut", "camera", "t1")
# images per identity of the dataset the tool tests share (the ``ids`` fixture of conftest.py): 14 images, 4 identities
COUNTS = (3, 5, 2, 4)
N, K = sum(COUNTS), len(COUNTS)
_CACHE: dict[tuple[int, ...], list[tuple[str, list[bytes]]]] = {}


def _crops(rgb: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` different 112×112 RGB crops (shifted/zoomed squares around the centre) of an RGB photo."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    out = []
    for i in range(n):
        side = int(min(h, w) * (0.55 + 0.4 * rng.random()))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = cv2.resize(rgb[y : y + side, x : x + side], (112, 112), interpolation=cv2.INTER_AREA)
        if i % 2:
            crop = crop[:, ::-1]
        out.append(np.ascontiguousarray(crop))
    return out


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB image (stored RGB, as in the datasets)."""
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def decode_rgb(body: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def identities(counts: tuple[int, ...] = COUNTS) -> list[tuple[str, list[bytes]]]:
    """``[(name, [jpeg bytes, ...]), ...]``: one real photo per identity, ``counts[i]`` crops of it."""
    if counts not in _CACHE:
        result = []
        for i, n in enumerate(counts):
            name = IDENTITIES[i % len(IDENTITIES)]
            rgb = photos.load_rgb(name)
            result.append((f"{name}_{i}", [jpeg(c) for c in _crops(rgb, n, seed=i)]))
        _CACHE[counts] = result
    return [(name, list(bodies)) for name, bodies in _CACHE[counts]]


def _write_common(out: Path, ids, image_size=(112, 112)) -> None:
    (out / "property").write_text(f"{len(ids)},{image_size[0]},{image_size[1]}\n")


Rec = tuple[int, IRHeader, bytes]  # (key, header, body) in write order


def face2rec2_records(ids: list[tuple[str, list[bytes]]], label_style: str = "pair") -> list[Rec]:
    """Records of the face2rec2 layout in write order: images 1..N, key 0, identity records N+1..N+K."""
    recs: list[Rec] = []
    ranges = []
    key = 1
    for label, (_, bodies) in enumerate(ids):
        start = key
        for body in bodies:
            lab = [float(label), 1.0] if label_style == "pair" else float(label)
            recs.append((key, IRHeader(0, lab, key, 0), body))
            key += 1
        ranges.append((start, key))
    n, k = key - 1, len(ids)
    recs.append((0, IRHeader(0, [float(n + 1), float(n + 1 + k)], 0, 0), b""))
    for i, (s, e) in enumerate(ranges):
        recs.append((n + 1 + i, IRHeader(0, [float(s), float(e)], n + 1 + i, 0), b""))
    return recs


def write_records(out: Path, recs: list[Rec], num_classes: int | None = None, image_size=(112, 112)) -> None:
    """Write ``recs`` (in order) as ``out/train.rec`` + ``train.idx`` (+ ``property`` if ``num_classes``)."""
    out.mkdir(parents=True, exist_ok=True)
    rec = MXIndexedRecordIO(out / "train.idx", out / "train.rec", "w")
    for key, header, body in recs:
        rec.write_idx(key, pack(header, body))
    rec.close()
    if num_classes is not None:
        (out / "property").write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")


def write_face2rec2(
    out: Path, ids: list[tuple[str, list[bytes]]], label_style: str = "pair", lst: bool = True
) -> dict[int, tuple[int, bytes]]:
    """face2rec2 layout in ``out`` (with property and train.lst); returns ``{key: (label, body)}`` of the images."""
    recs = face2rec2_records(ids, label_style)
    write_records(out, recs, len(ids))
    n = sum(len(b) for _, b in ids)
    images = {k: (int(np.ravel(h.label)[0]), body) for k, h, body in recs if 1 <= k <= n}
    if lst:
        lines = [
            f"1\t/data/{name}/{j:03d}.jpg\t{label}"
            for label, (name, bodies) in enumerate(ids)
            for j in range(len(bodies))
        ]
        (out / "train.lst").write_text("\n".join(lines) + "\n")
    return images


def write_released(out: Path, ids: list[tuple[str, list[bytes]]]) -> dict[int, tuple[int, bytes]]:
    """InsightFace released-rec style: key 0 first, each identity record then its images, scalar labels."""
    out.mkdir(parents=True, exist_ok=True)
    n = sum(len(b) for _, b in ids)
    k = len(ids)
    images: dict[int, tuple[int, bytes]] = {}
    rec = MXIndexedRecordIO(out / "train.idx", out / "train.rec", "w")
    rec.write_idx(0, pack(IRHeader(0, [float(n + 1), float(n + 1 + k)], 0, 0), b""))
    key = 1
    for label, (_, bodies) in enumerate(ids):
        rec.write_idx(n + 1 + label, pack(IRHeader(0, [float(key), float(key + len(bodies))], n + 1 + label, 0), b""))
        for body in bodies:
            rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), body))
            images[key] = (label, body)
            key += 1
    rec.close()
    _write_common(out, ids)
    return images


def write_flat(
    out: Path, ids: list[tuple[str, list[bytes]]], shuffle_seed: int | None = None
) -> dict[int, tuple[int, bytes]]:
    """Flat layout: keys 0..N-1 in write order, scalar labels, no meta records."""
    out.mkdir(parents=True, exist_ok=True)
    items = [(label, body) for label, (_, bodies) in enumerate(ids) for body in bodies]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    images: dict[int, tuple[int, bytes]] = {}
    rec = MXIndexedRecordIO(out / "train.idx", out / "train.rec", "w")
    for key, (label, body) in enumerate(items):
        rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), body))
        images[key] = (label, body)
    rec.close()
    _write_common(out, ids)
    return images


KINDS = ("pair", "scalar", "released", "flat")


def write_kind(
    kind: str, out: Path, ids: list[tuple[str, list[bytes]]], shuffle_seed: int | None = None
) -> dict[int, tuple[int, bytes]]:
    """One of ``KINDS`` in ``out``: face2rec2 with pair or scalar labels, released, or flat (shuffled with
    ``shuffle_seed`` when given); returns ``{key: (label, body)}`` of the images."""
    if kind in ("pair", "scalar"):
        return write_face2rec2(out, ids, kind)
    if kind == "released":
        return write_released(out, ids)
    if kind == "flat":
        return write_flat(out, ids, shuffle_seed)
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")


def idx_entries(path: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in line.split("\t")) for line in path.read_text().splitlines() if line]
