"""The inputs of ``gpu-align run``: a ``root/<identity>/<image>`` folder or a face2rec2 ``.lst``, as one ordered list.

Folders are listed by :func:`packer.scan.scan_folder` (identities in sorted order, images sorted, other files
reported). A ``.lst`` is read by :func:`packer.lst.read_lst`: its label is the identity, its lines must be grouped
by label, relative paths are relative to the ``.lst``'s folder, and a line that carries landmarks is warped with
them instead of being detected again (that is how ``train.lst`` rebuilds a dataset without detection).

``--shard i/n`` splits the identities (never one identity across shards) into n contiguous blocks of about equal
image counts, so merging the shards in order (``gpu-align merge``) gives the same labels as one unsharded run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer.errors import UserError
from packer.lst import read_lst
from packer.scan import DEFAULT_EXTS, scan_folder

__all__ = ["InputItem", "Source", "parse_shard", "scan_source"]


@dataclass(frozen=True)
class InputItem:
    """One photo to align.

    Attributes:
        index: position in :attr:`Source.items` (what the decoder and the writer count).
        path: absolute path of the photo.
        group: identity: the folder name, or the ``.lst`` label as text.
        landmarks: ``(5, 2)`` float32 (x, y) from the ``.lst``, or None to detect.
        bbox: ``(x1, y1, x2, y2)`` from the ``.lst`` (with ``landmarks``), else None.
        bad_landmarks: the ``.lst`` line's landmarks cannot place a face (``"bad landmarks: ..."``): the photo
            is skipped with this reason, never detected instead.
    """

    index: int
    path: str
    group: str
    landmarks: np.ndarray | None = None
    bbox: tuple[int, int, int, int] | None = None
    bad_landmarks: str | None = None


@dataclass
class Source:
    """Ordered inputs (grouped by identity) plus what the scan left out."""

    kind: str  # "folder" | "lst"
    root: str
    items: list[InputItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while scanning

    def input_records(self) -> list[list]:
        """Per input what decides its output: ``[identity, path, size, mtime_ns, shape]``.

        ``shape`` is the ``.lst``'s box and landmarks as text ("" to detect, the reason for unusable ones). Size
        and mtime cost one ``os.stat`` per file (~5 ms per 1,000 files, page-cached); a content hash would read the
        whole source a second time. An unreadable file has size and mtime -1 (decoding then reports it).
        """
        out = []
        for it in self.items:
            try:
                st = os.stat(it.path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            shape = it.bad_landmarks or ""  # unusable landmarks: the reason is what the output holds
            if it.landmarks is not None:
                shape = " ".join(f"{float(v):.9g}" for v in (*(it.bbox or ()), *np.asarray(it.landmarks).reshape(-1)))
            out.append([it.group, it.path, size, mtime, shape])
        return out

    def fingerprint(self, records: list[list] | None = None) -> str:
        """A hash of :meth:`input_records` (paths, identities, sizes, mtimes, .lst landmarks): a resume must see
        the same inputs."""
        h = hashlib.sha256()
        for group, path, size, mtime, shape in records if records is not None else self.input_records():
            h.update(f"{group}\t{path}\t{size}\t{mtime}\t{shape}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) to ``(i, n)``; None passes through."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _shard_groups(groups: list[str], counts: list[int], shard: tuple[int, int]) -> set[str]:
    """Identities of shard ``i`` of ``n``: contiguous blocks cut where the running image count crosses k·total/n."""
    i, n = shard
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts else np.zeros(0)
    block = (starts * n) // max(1, sum(counts))  # block of each identity, by where its first image falls
    return {g for g, b in zip(groups, block.tolist(), strict=True) if b == i}


def _from_folder(root: str, min_images: int) -> Source:
    scan = scan_folder(root, exts=DEFAULT_EXTS, min_images=min_images, aligned=0, absolute=True)
    src = Source("folder", os.path.abspath(root), skipped=list(scan.skipped))
    src.items = [InputItem(k, e.path, scan.identities[e.label]) for k, e in enumerate(scan.entries)]
    return src


def _from_lst(path: str, root: str | None) -> Source:
    base = Path(root).resolve() if root else Path(path).resolve().parent
    src = Source("lst", str(Path(path).resolve()))
    for k, e in enumerate(read_lst(path)):
        p = e.path if os.path.isabs(e.path) else str(base / e.path)
        lms = None
        if e.landmarks is not None:
            lms = np.asarray(e.landmarks, np.float32).reshape(2, 5).T.copy()  # x1..x5 y1..y5 -> (5, 2)
        bbox = e.bbox if lms is not None else None
        src.items.append(InputItem(k, p, str(e.label), lms, bbox, e.bad_landmarks))
    return src


def scan_source(
    src: str | os.PathLike,
    *,
    min_images: int = 1,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    lst_root: str | os.PathLike | None = None,
) -> Source:
    """List the inputs of a run, in the order they are packed.

    Args:
        src: a ``root/<identity>/<image>`` folder or a face2rec2 ``.lst`` file.
        min_images: identities with fewer photos are left out here already (and again after detection misses,
            by the writer).
        shard: ``(i, n)``: keep only this shard's identities (see the module docstring).
        limit: keep only the first ``limit`` inputs (a quick trial run).
        lst_root: folder that a ``.lst``'s relative paths start from (default: the ``.lst``'s folder).
    """
    s = os.fspath(src)
    if not os.path.exists(s):
        raise UserError(f"{s}: no such folder or .lst file")
    source = _from_folder(s, min_images) if os.path.isdir(s) else _from_lst(s, lst_root and os.fspath(lst_root))
    if shard is not None:
        groups: list[str] = []
        counts: list[int] = []
        for it in source.items:
            if not groups or groups[-1] != it.group:
                groups.append(it.group)
                counts.append(0)
            counts[-1] += 1
        keep = _shard_groups(groups, counts, shard)
        source.items = [it for it in source.items if it.group in keep]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        source.items = source.items[:limit]
    source.items = [dataclasses.replace(it, index=k) for k, it in enumerate(source.items)]
    if not source.items:
        raise UserError(f"{s}: no images to align" + (" in this shard" if shard else ""))
    return source
