"""The inputs of ``gpu-align run``: a ``root/<identity>/<image>`` folder, a face2rec2 ``.lst``, a ``.tar`` /
``.tar.gz`` of such a folder, or WebDataset shards, as one ordered list.

Folders are listed by :func:`packer.scan.scan_folder` (identities in sorted order, images sorted, other files
reported). A ``.lst`` is read by :func:`packer.lst.read_lst`: its label is the identity, its lines must be grouped
by label, relative paths are relative to the ``.lst``'s folder, and a line that carries landmarks is warped with
them instead of being detected again (that is how ``train.lst`` rebuilds a dataset without detection).

Archives (:mod:`packer.archive`) are indexed from their headers and scanned with the folder's rules, so a run on
``x.tar.gz`` lists the same identities, labels and photo order as a run on the extracted folder; the photos'
paths are ``x.tar.gz::train/n000002/0001_01.jpg``. A ``.lst`` may name members that way too. A compressed archive
is read as one stream: an archive whose order is too far from the dataset's needs more reorder memory than
``GPU_ALIGN_ARCHIVE_BUFFER_MB`` (default 1024) and is refused before the run, with what to do instead.

``--shard i/n`` splits the identities (never one identity across shards) into n contiguous blocks of about equal
image counts (:func:`shard_blocks`, which a Ray run cuts its one scan with too), so merging the shards in order
(``gpu-align merge``) gives the same labels as one unsharded run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer import archive as tar
from packer.errors import UserError
from packer.imageinfo import DEFAULT_MAX_PIXELS, UNREADABLE, ImageError
from packer.lst import read_lst
from packer.scan import DEFAULT_EXTS, scan_folder

__all__ = ["InputItem", "Source", "decode_items", "parse_shard", "scan_source", "shard_blocks"]


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
        member: the archive member the photo is (``path`` is then ``archive::name``), else None.
        ref_box: ``(x1, y1, x2, y2)`` from ``--boxes-csv``: keep the detected face that overlaps it best.
    """

    index: int
    path: str
    group: str
    landmarks: np.ndarray | None = None
    bbox: tuple[int, int, int, int] | None = None
    bad_landmarks: str | None = None
    member: tar.Member | None = None
    ref_box: tuple[float, float, float, float] | None = None


@dataclass
class Source:
    """Ordered inputs (grouped by identity) plus what the scan left out."""

    kind: str  # "folder" | "lst" | "archive" | "webdataset"
    root: str
    items: list[InputItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while scanning
    csv: list = field(default_factory=list)  # gpu_align.csvmeta.CsvMatch per --landmarks-csv / --boxes-csv

    def input_records(self) -> list[list]:
        """Per input what decides its output: ``[identity, path, size, mtime_ns, shape]``.

        ``shape`` is the ``.lst``'s box and landmarks as text ("" to detect, the reason for unusable ones). Size
        and mtime cost one ``os.stat`` per file (~5 ms per 1,000 files, page-cached); a content hash would read the
        whole source a second time. An unreadable file has size and mtime -1 (decoding then reports it). An
        archive member has its tar header's size and mtime (what extracting it would give the file).
        """
        out = []
        for it in self.items:
            if it.member is not None:
                size, mtime = it.member.size, it.member.mtime_ns
            elif tar.split_member_path(it.path) is not None:
                size = mtime = -1  # a .lst line naming a member the archive does not have
            else:
                try:
                    st = os.stat(it.path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size = mtime = -1
            shape = it.bad_landmarks or ""  # unusable landmarks: the reason is what the output holds
            if it.landmarks is not None:
                shape = " ".join(f"{float(v):.9g}" for v in (*(it.bbox or ()), *np.asarray(it.landmarks).reshape(-1)))
            if it.ref_box is not None:  # --boxes-csv: the reference box decides which face is kept
                shape += " box " + " ".join(f"{v:.9g}" for v in it.ref_box)
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


def shard_blocks(items: Sequence[InputItem], n: int) -> list[list[InputItem]]:
    """``items`` (grouped by identity) cut into ``n`` contiguous blocks of whole identities: the shards of
    ``--shard i/n`` (block ``i`` is what ``scan_source(shard=(i, n))`` keeps) and of a Ray run.

    An identity goes to block ``floor(start * n / total)``, ``start`` being the position of its first photo, so the
    cuts fall where the running photo count crosses ``k * total / n`` and never inside an identity. A block is
    empty when one identity holds more than ``1/n`` of the photos. The items keep their indices (callers renumber).
    """
    blocks: list[list[InputItem]] = [[] for _ in range(n)]
    total = max(1, len(items))
    block = 0
    for k, it in enumerate(items):
        if k == 0 or items[k - 1].group != it.group:  # an identity starts: its block, by where its first photo is
            block = (k * n) // total
        blocks[block].append(it)
    return blocks


def _from_folder(root: str, min_images: int) -> Source:
    scan = scan_folder(root, exts=DEFAULT_EXTS, min_images=min_images, aligned=0, absolute=True)
    src = Source("folder", os.path.abspath(root), skipped=list(scan.skipped))
    src.items = [InputItem(k, e.path, scan.identities[e.label]) for k, e in enumerate(scan.entries)]
    return src


def _from_lst(path: str, root: str | None) -> Source:
    base = Path(root).resolve() if root else Path(path).resolve().parent
    src = Source("lst", str(Path(path).resolve()))
    archives: dict[str, dict[str, tar.Member]] = {}  # each archive a .lst names is indexed once
    for k, e in enumerate(read_lst(path)):
        member = None
        ref = tar.split_member_path(e.path)
        if ref is not None:  # archive::member
            arc = os.path.normpath(ref[0] if os.path.isabs(ref[0]) else str(base / ref[0]))
            if arc not in archives:
                idx = tar.index_archive(arc)
                if idx.problem:
                    _warn(f"{arc}: {idx.problem}")
                archives[arc] = {m.name: m for m in idx.files}
            member = archives[arc].get(ref[1].strip("/"))
            p = tar.member_path(arc, ref[1])
        else:
            p = e.path if os.path.isabs(e.path) else str(base / e.path)
        lms = None
        if e.landmarks is not None:
            lms = np.asarray(e.landmarks, np.float32).reshape(2, 5).T.copy()  # x1..x5 y1..y5 -> (5, 2)
        bbox = e.bbox if lms is not None else None
        src.items.append(InputItem(k, p, str(e.label), lms, bbox, e.bad_landmarks, member))
    return src


def _warn(message: str) -> None:
    print(f"gpu-align: warning: {message}", file=sys.stderr)


def _from_archives(s: str, min_images: int) -> Source:
    """One archive (``x.tar.gz`` or ``x.tar.gz::folder``) or WebDataset shards, scanned like the extracted folder."""
    kind, root, scan = tar.scan_archive_source(s, min_images=min_images)
    for where, problem in scan.problems:
        _warn(f"{where}: {problem}")
    src = Source(kind, root)
    src.skipped = list(scan.problems) + list(scan.skipped)
    src.items = [InputItem(k, m.path, ident, member=m) for k, (ident, m) in enumerate(scan.entries)]
    return src


def reorder_limit() -> int:
    """The reorder buffer for compressed archives, in bytes (``GPU_ALIGN_ARCHIVE_BUFFER_MB``, default 1024)."""
    text = os.environ.get("GPU_ALIGN_ARCHIVE_BUFFER_MB")
    try:
        return int(float(text) * 2**20) if text else tar.DEFAULT_REORDER_BYTES
    except ValueError:
        raise UserError(f"GPU_ALIGN_ARCHIVE_BUFFER_MB must be a number of MiB, got {text!r}") from None


def _check_reorder(items: list[InputItem]) -> None:
    """Refuse, before the run, a compressed archive whose member order needs more reorder memory than allowed."""
    need = tar.reorder_bytes(it.member for it in items if it.member is not None and it.member.stream)
    limit = reorder_limit()
    if sum(need.values()) <= limit:
        return
    worst = max(need, key=need.__getitem__)
    name = os.path.basename(worst)
    raise UserError(
        f"{worst}: its members are stored far from the order the dataset is written in (identities sorted, photos "
        f"sorted inside each); streaming this compressed archive would hold {need[worst] / 2**20:,.0f} MiB of photos "
        f"in memory (limit {limit / 2**20:,.0f} MiB). A plain .tar is read in any order without that memory: "
        f"`gunzip -k {name}` (one file, nothing extracted) and pass the .tar; or repack it in order (GNU tar: "
        f"--sort=name); or raise the limit with GPU_ALIGN_ARCHIVE_BUFFER_MB"
    )


def _raise(err: ImageError):
    raise err


def decode_items(items: Sequence[InputItem], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple]:
    """What :meth:`gpu_align.decode.Decoder.batches` takes for ``items``: ``(index, path)`` for files on disk,
    ``(index, path, data)`` for archive members.

    Members of a plain ``.tar`` are read by offset in the decoder's reader threads (``data`` is a callable); those
    of a compressed archive come from one stream, decompressed by a background thread in input order (``data``
    is the bytes). Folder inputs go through untouched, so a folder run is read exactly as before.
    """
    if not any(it.member is not None or tar.split_member_path(it.path) for it in items):
        yield from ((it.index, it.path) for it in items)
        return
    reader = tar.ArchiveReader(4 * max_pixels + (1 << 20))  # the size limit read_image_file applies to files

    def produce() -> Iterator[tuple]:
        stream = reader.ordered([it.member for it in items if it.member is not None and it.member.stream])
        for it in items:
            m = it.member
            if m is None and tar.split_member_path(it.path) is not None:
                err = ImageError(UNREADABLE, "no member of that name in the archive")
                yield it.index, it.path, functools.partial(_raise, err)
            elif m is None:
                yield it.index, it.path
            elif m.stream:
                got = next(stream)
                yield it.index, it.path, (functools.partial(_raise, got) if isinstance(got, ImageError) else got)
            else:
                yield it.index, it.path, functools.partial(reader.read, m)
        stream.close()

    try:
        yield from tar.prefetched(produce(), depth=128)
    finally:
        reader.close()


def scan_source(
    src: str | os.PathLike,
    *,
    min_images: int = 1,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    lst_root: str | os.PathLike | None = None,
    landmarks_csv: str | os.PathLike | None = None,
    boxes_csv: str | os.PathLike | None = None,
) -> Source:
    """List the inputs of a run, in the order they are packed.

    Args:
        src: a ``root/<identity>/<image>`` folder, a face2rec2 ``.lst`` file, a ``.tar``/``.tar.gz``/``.tgz`` of
            ``[prefix/]<identity>/<image>`` (``x.tar.gz::prefix`` names the folder inside), or WebDataset shards
            (a folder of ``.tar`` files, or a brace list ``shards-{000..009}.tar``).
        min_images: identities with fewer photos are left out here already (and again after detection misses,
            by the writer).
        shard: ``(i, n)``: keep only this shard's identities (see the module docstring).
        limit: keep only the first ``limit`` inputs (a quick trial run).
        lst_root: folder that a ``.lst``'s relative paths start from (default: the ``.lst``'s folder).
        landmarks_csv, boxes_csv: VGGFace2 ``loose_landmark`` / ``loose_bb`` files (:mod:`gpu_align.csvmeta`),
            matched against all photos before ``shard`` and ``limit`` cut them.
    """
    s = os.fspath(src)
    if tar.names_archives(s):
        source = _from_archives(s, min_images)
    elif not os.path.exists(s):
        raise UserError(f"{s}: no such folder, archive or .lst file")
    elif os.path.isdir(s):
        source = _from_folder(s, min_images)
    else:
        source = _from_lst(s, lst_root and os.fspath(lst_root))
    if landmarks_csv or boxes_csv:
        from gpu_align.csvmeta import apply_csvs

        source.items, source.csv = apply_csvs(
            source.items,
            landmarks=landmarks_csv and os.fspath(landmarks_csv),
            boxes=boxes_csv and os.fspath(boxes_csv),
        )
    if shard is not None:
        source.items = shard_blocks(source.items, shard[1])[shard[0]]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        source.items = source.items[:limit]
    source.items = [dataclasses.replace(it, index=k) for k, it in enumerate(source.items)]
    _check_reorder(source.items)
    if source.csv:
        from gpu_align.csvmeta import note_photos_without_row

        note_photos_without_row(source.csv, source.items)
    if not source.items:
        raise UserError(f"{s}: no images to align" + (" in this shard" if shard else ""))
    return source
