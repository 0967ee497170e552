"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ...): read, write, and build them from a pairs list.

A ``.bin`` is a pickle of ``(list_of_image_bytes, list_of_bools)``: images in the order a0, b0, a1, b1, ... and
one bool per pair (True = same person). InsightFace loads it with ``pickle.load(f, encoding='bytes')`` (the
``encoding`` is for the Python 2 pickles of the released bins) and decodes each entry with ``mx.image.imdecode``
or ``cv2.imdecode``. We write protocol 4 (Python >= 3.4), images as ``bytes``, the flags as Python bools.

Reading uses a restricted unpickler (only containers, bytes, bools, and numpy arrays), so inspecting an untrusted
``.bin`` cannot run code.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import pickle
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packer.errors import UserError
from packer.fsutil import atomic_write
from packer.reader import image_format, image_shape

__all__ = ["PairSource", "PairsEntry", "draw_pairs", "load_pair_source", "read_bin", "read_pairs", "write_bin"]

PICKLE_PROTOCOL = 4

PairsEntry = tuple[Path, Path, bool]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("codecs", "encode"),  # protocol-2 pickles of bytes made by Python 3
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a verification .bin")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """``(images, issame)`` of an InsightFace ``.bin``: ``2 * len(issame)`` image byte strings and the pair flags."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            data = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"{p} is not an InsightFace verification .bin (unpickling failed: {e})") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise UserError(f"{p} is not an InsightFace verification .bin (expected a pickled (images, issame) pair)")
    bins, issame = data
    images = [bytes(b.tobytes() if hasattr(b, "tobytes") else b) for b in bins]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise UserError(f"{p}: {len(images)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    return images, flags


def write_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool]) -> None:
    """Write ``(images, issame)`` as an InsightFace ``.bin`` atomically (temporary file, then rename)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    p = Path(path)
    buf = io.BytesIO()
    pickle.dump(([bytes(b) for b in images], [bool(x) for x in issame]), buf, protocol=PICKLE_PROTOCOL)
    atomic_write(p, buf.getvalue())


def read_pairs(path: str | os.PathLike) -> list[PairsEntry]:
    """Parse a pairs list: one ``pathA pathB 0|1`` per line (1 = same person), whitespace or tab separated.

    A line with a tab is split on tabs only (so paths may contain spaces); otherwise on any whitespace. Paths
    are relative to the pairs file's folder (or absolute). Blank lines and ``#`` comments are skipped.
    UserError with ``file:line`` for a malformed line or a missing image.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    base = p.parent
    out: list[PairsEntry] = []
    for lineno, raw in enumerate(p.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [x.strip() for x in line.split("\t")] if "\t" in line else line.split()
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            hint = ""
            if len(fields) in (3, 4) and fields[-1].isdigit() and fields[-2].isdigit():
                hint = " (this looks like LFW's pairs.txt 'name n1 n2' format; list image paths instead)"
            raise UserError(f"{p}:{lineno}: expected 'pathA pathB 0|1', got {line[:80]!r}{hint}")
        a, b = (Path(x) if Path(x).is_absolute() else base / x for x in fields[:2])
        for img in (a, b):
            if not img.is_file():
                raise UserError(f"{p}:{lineno}: image {img} does not exist")
        out.append((a, b, fields[2] == "1"))
    if not out:
        raise UserError(f"{p}: no pairs")
    return out


def load_pair_images(pairs: list[PairsEntry], progress: bool = False) -> tuple[list[bytes], tuple[int, int]]:
    """Read the images of ``pairs`` (a0, b0, a1, b1, ...) as stored bytes; all must be JPEG/PNG of one size.

    Returns the byte strings and their common ``(height, width)``. UserError names the offending file.
    """
    paths = [x for a, b, _ in pairs for x in (a, b)]
    return _check_images(((str(p), p.read_bytes) for p in paths), len(paths), progress)


def _check_images(
    named: Iterable[tuple[str, Callable[[], bytes]]], total: int, progress: bool
) -> tuple[list[bytes], tuple[int, int]]:
    """Read ``(name, read)`` pairs; every image must be JPEG/PNG of one size. UserError names the offending one."""
    it = named
    if progress:
        from tqdm import tqdm

        it = tqdm(named, total=total, desc="read pairs", unit="img", mininterval=0.5)
    images: list[bytes] = []
    size: tuple[int, int] | None = None
    first = ""
    for name, read in it:
        body = read()
        if image_format(body) not in ("jpeg", "png"):
            raise UserError(f"{name}: not a JPEG or PNG image (InsightFace decodes .bin entries as images)")
        try:
            shape = image_shape(body)
        except ValueError as e:
            raise UserError(f"{name}: cannot read the image: {e}") from None
        if size is None:
            size, first = shape, name
        elif shape != size:
            raise UserError(
                f"{name} is {shape[0]}x{shape[1]} but {first} is {size[0]}x{size[1]}: "
                "a verification set holds aligned crops of one size"
            )
        images.append(body)
    assert size is not None
    return images, size


# ------------------------------------------------------------------------------------------ pairs drawn from data

Pair = tuple[Hashable, Hashable, bool]


def _pairs_within(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _draw_same(groups: Sequence[Sequence[Hashable]], k: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """``k`` distinct ``(group, i, j)`` with ``i < j``: a uniformly chosen identity, then a uniform pair in it.

    Choosing the identity first keeps the set spread over people (as LFW's is), not dominated by the largest
    identities. An identity whose pairs run low switches to its explicit list of unused pairs, so the draw never
    spins on rejections; that list is at most twice what was drawn from it.
    """
    pool = [g for g, items in enumerate(groups) if len(items) >= 2]
    used: set[tuple[int, int, int]] = set()
    taken = dict.fromkeys(pool, 0)
    left: dict[int, list[tuple[int, int]]] = {}
    out: list[tuple[int, int, int]] = []
    while len(out) < k:
        slot = rng.randrange(len(pool))
        g = pool[slot]
        n, cap = len(groups[g]), math.comb(len(groups[g]), 2)
        if g in left:
            i, j = left[g].pop()
        else:
            i, j = rng.randrange(n), rng.randrange(n - 1)
            j += j >= i
            i, j = min(i, j), max(i, j)
            if (g, i, j) in used:
                continue
        used.add((g, i, j))
        out.append((g, i, j))
        taken[g] += 1
        if taken[g] == cap:
            pool[slot] = pool[-1]
            pool.pop()
        elif g not in left and 2 * taken[g] > cap:
            rest = [p for p in _pairs_within(n) if (g, *p) not in used]
            rng.shuffle(rest)
            left[g] = rest
    return out


def _draw_different(
    groups: Sequence[Sequence[Hashable]], k: int, rng: random.Random
) -> list[tuple[int, int, int, int]]:
    """``k`` distinct unordered ``(g1, i, g2, j)``, ``g1 < g2``: two uniformly chosen identities, an image of each.

    Rejections (a pair drawn twice) only pile up when some identity pairs are nearly used up; after many, the rest
    is drawn image-uniformly (an image, then an image of another identity), which never stalls.
    """
    pool = [g for g, items in enumerate(groups) if items]
    sizes = [len(groups[g]) for g in pool]
    total = sum(sizes)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    used: set[tuple[int, int, int, int]] = set()
    out: list[tuple[int, int, int, int]] = []
    tries = 0
    while len(out) < k:
        tries += 1
        if tries < 20 * k + 1000:
            a, b = rng.randrange(len(pool)), rng.randrange(len(pool) - 1)
            b += b >= a
            i, j = rng.randrange(sizes[a]), rng.randrange(sizes[b])
        else:
            x = rng.randrange(total)
            a = bisect.bisect_right(starts, x) - 1
            y = rng.randrange(total - sizes[a])
            y += sizes[a] if y >= starts[a] else 0  # skip a's own images
            b = bisect.bisect_right(starts, y) - 1
            i, j = x - starts[a], y - starts[b]
        if a > b:
            a, b, i, j = b, a, j, i
        key = (pool[a], i, pool[b], j)
        if key not in used:
            used.add(key)
            out.append(key)
    return out


def _capacity(sizes: Sequence[int]) -> tuple[int, int]:
    """Distinct same-identity and different-identity pairs that identities of these sizes give."""
    total = sum(sizes)
    return sum(math.comb(s, 2) for s in sizes), (total * total - sum(s * s for s in sizes)) // 2


def max_pairs(sizes: Sequence[int]) -> int:
    """The largest ``n_pairs`` :func:`draw_pairs` accepts for identities of these sizes (0: none)."""
    return 2 * min(_capacity(sizes))


def draw_pairs(groups: Sequence[Sequence[Hashable]], n_pairs: int, seed: int = 0) -> list[Pair]:
    """Draw ``n_pairs`` verification pairs from ``groups`` (one list of distinct items per identity), seeded.

    Half are same-identity pairs, half different-identity pairs, no pair twice (in either order); the list
    alternates same, different, same, ... so that any contiguous fold of an even size (InsightFace's evaluation
    folds the pairs in order) is balanced too; each pair's two sides are in random order. Same ``groups`` and
    ``seed`` -> the same pairs (Python's ``random.Random``, the same on every platform).

    UserError: an odd or non-positive ``n_pairs``; fewer than 2 identities; no identity with 2 images; or more
    pairs of a kind asked for than there are distinct ones (the message gives the largest ``n_pairs`` possible).
    """
    if n_pairs < 2 or n_pairs % 2:
        raise UserError(f"--pairs must be a positive even number (half same, half different), got {n_pairs}")
    half = n_pairs // 2
    sizes = [len(g) for g in groups]
    if sum(s > 0 for s in sizes) < 2:
        raise UserError(
            f"different-identity pairs need at least 2 identities with images; found {sum(s > 0 for s in sizes)}"
        )
    if not any(s >= 2 for s in sizes):
        raise UserError("same-identity pairs need an identity with at least 2 images; every identity has 1")
    same_cap, diff_cap = _capacity(sizes)
    most = 2 * min(same_cap, diff_cap)
    if half > same_cap or half > diff_cap:
        kind, cap = ("same-identity", same_cap) if half > same_cap else ("different-identity", diff_cap)
        raise UserError(
            f"{n_pairs} pairs need {half} distinct {kind} pairs, but these images give only {cap}; "
            f"use --pairs {most} or fewer"
        )
    rng = random.Random(seed)
    # Asked for half or more of what exists: sample the explicit list (at most 2 * half long) instead of rejecting.
    if 2 * half >= same_cap:
        drawn_same = rng.sample(
            [(g, i, j) for g, items in enumerate(groups) for i, j in _pairs_within(len(items))], half
        )
    else:
        drawn_same = _draw_same(groups, half, rng)
    if 2 * half >= diff_cap:
        nz = [g for g, n in enumerate(sizes) if n]
        every = [
            (g1, i, g2, j)
            for x, g1 in enumerate(nz)
            for g2 in nz[x + 1 :]
            for i in range(sizes[g1])
            for j in range(sizes[g2])
        ]
        drawn_diff = rng.sample(every, half)
    else:
        drawn_diff = _draw_different(groups, half, rng)
    same: list[Pair] = []
    for g, i, j in drawn_same:
        a, b = (groups[g][i], groups[g][j]) if rng.random() < 0.5 else (groups[g][j], groups[g][i])
        same.append((a, b, True))
    diff: list[Pair] = []
    for g1, i, g2, j in drawn_diff:
        a, b = (groups[g1][i], groups[g2][j]) if rng.random() < 0.5 else (groups[g2][j], groups[g1][i])
        diff.append((a, b, False))
    return [p for pair in zip(same, diff, strict=True) for p in pair]


@dataclass
class PairSource:
    """Images to draw pairs from: ``groups[k]`` = the item ids of identity ``names[k]``; ``read(item)`` -> bytes."""

    kind: str  # "dataset" or "folder"
    names: list[str]
    groups: list[list[Hashable]]
    read: Callable[[Hashable], bytes]
    describe: Callable[[Hashable], str]
    close: Callable[[], None] = lambda: None


def _read_identity_list(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file (--identities: one identity name or label per line)")
    names = []
    for raw in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            names.append(line)
    if not names:
        raise UserError(f"{p}: no identities listed")
    return names


def _restrict(src: PairSource, wanted: list[str], lookup: dict[str, int], listfile: str) -> PairSource:
    missing = [w for w in wanted if w not in lookup]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise UserError(f"{listfile}: {len(missing)} listed identities are not in the source: {shown}")
    keep = sorted(set(lookup[w] for w in wanted))
    return PairSource(
        src.kind, [src.names[k] for k in keep], [src.groups[k] for k in keep], src.read, src.describe, src.close
    )


def load_pair_source(path: str | os.PathLike, identities: str | os.PathLike | None = None) -> PairSource:
    """A dataset (``DIR`` with ``train.rec``, or an ``X.rec``/``X.idx``) or a ``root/<identity>/<image>`` folder of
    aligned crops, as identities and their images; ``identities`` restricts it to a listed (held-out) set.

    In a dataset a listed line is a class label (``0``..``C-1``) or, through ``train.lst``, the identity folder
    name that label came from; in a folder it is a folder name.
    """
    from packer.reader import DatasetReader, resolve_dataset

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    is_dataset = p.is_file() or (p / "train.rec").is_file()
    if is_dataset:
        resolve_dataset(p)  # the usual errors for a missing .idx and the like
        reader = DatasetReader(p)
        try:
            ranges = reader.identity_ranges()
            if ranges is not None:
                groups: list[list[Hashable]] = [list(range(a, b)) for a, b in ranges]
            else:
                groups = [[] for _ in range(reader.num_classes)]
                for key, label in zip(reader.image_keys(), reader.labels().tolist(), strict=True):
                    while label >= len(groups):
                        groups.append([])
                    groups[label].append(key)
        except BaseException:
            reader.close()
            raise
        src = PairSource(
            "dataset",
            [str(k) for k in range(len(groups))],
            groups,
            read=lambda key: reader.read(int(key)).body,
            describe=lambda key: f"{reader.paths.rec} key {key}",
            close=reader.close,
        )
        if identities is None:
            return src
        lookup = {str(k): k for k in range(len(groups))}
        lst = reader.paths.lst
        if lst.is_file():
            from packer.lst import read_lst

            for entry in read_lst(lst, require_grouped=False):
                lookup.setdefault(Path(entry.path).parent.name, entry.label)
        try:
            return _restrict(src, _read_identity_list(identities), lookup, str(identities))
        except BaseException:
            reader.close()
            raise
    from packer.scan import scan_folder

    res = scan_folder(p)
    groups = [[] for _ in res.identities]
    for entry in res.entries:
        groups[entry.label].append(entry.path)
    src = PairSource("folder", list(res.identities), groups, read=lambda x: Path(str(x)).read_bytes(), describe=str)
    if identities is None:
        return src
    lookup = {name: k for k, name in enumerate(res.identities)}
    return _restrict(src, _read_identity_list(identities), lookup, str(identities))


def pairs_from_source(
    src: PairSource, n_pairs: int, seed: int = 0, progress: bool = False
) -> tuple[list[bytes], list[bool], tuple[int, int]]:
    """Draw pairs from ``src`` (see :func:`draw_pairs`) and read their images: ``(images, issame, (h, w))``."""
    pairs = draw_pairs(src.groups, n_pairs, seed)
    items = [x for a, b, _ in pairs for x in (a, b)]
    images, size = _check_images(((src.describe(x), lambda x=x: src.read(x)) for x in items), len(items), progress)
    return images, [same for _, _, same in pairs], size
