"""Tar archives as a photo source: ``.tar``, ``.tar.gz``/``.tgz`` and WebDataset shards, read without extracting.

VGGFace2 ships as one ``.tar.gz`` of 3.1 M small files; extracting it costs hours and millions of inodes. Here an
archive is read in two steps:

1. **Index** (:func:`index_archive`): one pass over the tar headers lists every member with its size, mtime and
   data offset. That pass gives the scan (identities, labels, the resume fingerprint) before any photo is decoded.
   A plain ``.tar`` is indexed by seeking from header to header; a compressed one must be decompressed once.
2. **Read**: a plain ``.tar`` is read by ``pread`` at the indexed offsets, in any order and from any thread
   (:meth:`ArchiveReader.read`). A ``.tar.gz`` cannot seek: :meth:`ArchiveReader.ordered` streams it once from the
   start and hands members over in the order they are asked for, holding members that arrive early in a bounded
   reorder buffer. How much buffer an order needs is computed from the index before the run
   (:func:`reorder_bytes`), so a too-scattered archive is refused up front with advice, never half-way.

Member names (``train/n000002/0001_01.jpg``) are made unambiguous paths as ``<archive>::<member>``
(:func:`member_path`, :func:`split_member_path`); that is what ``train.lst`` holds.

What is never read, and reported instead (as ``(path, reason)`` in :attr:`ArchiveIndex.skipped`): members whose name
escapes the archive (absolute, or with ``..``: ``tar -x`` refuses them too), links (not followed), devices, FIFOs,
sparse files, and earlier copies of a duplicated name (the last copy wins, as ``tar -x`` leaves it). A compressed
stream that ends early, or a plain tar cut off, is an archive-level problem (:attr:`ArchiveIndex.problem`): the
complete members before the cut are still used, the cut member fails as ``truncated``.

``tarfile`` (stdlib) does the header parsing; the ``webdataset`` library iterates samples in shard order but gives
no member offsets or random access, which the index needs, so it is not used. Torch-free (the packer imports it).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import re
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from packer.errors import UserError
from packer.imageinfo import TOO_LARGE, TRUNCATED, UNREADABLE, ImageError
from packer.lst import unlistable
from packer.scan import BAD_PATH, identity_order

__all__ = [
    "ARCHIVE_SEP",
    "ArchiveIndex",
    "ArchiveReader",
    "ArchiveScan",
    "Member",
    "expand_braces",
    "index_archive",
    "is_archive_name",
    "looks_like_archive",
    "member_path",
    "names_archives",
    "reorder_bytes",
    "scan_archive",
    "scan_archive_source",
    "scan_webdataset",
    "shard_list",
    "split_member_path",
    "wds_meta_member",
    "wds_split",
]

ARCHIVE_SEP = "::"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Reorder buffer for compressed archives: members that arrive before their turn are held in memory up to this.
DEFAULT_REORDER_BYTES = 1 << 30
_SMALL_META = 1 << 16  # .cls / .json members of WebDataset samples are read during indexing up to this size
_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png")
_WDS_JSON_KEYS = ("identity", "cls", "label", "class")

_SUFFIX_RE = re.compile(r"\.(tar|tar\.gz|tgz)" + re.escape(ARCHIVE_SEP), re.IGNORECASE)


def is_archive_name(path: str | os.PathLike) -> bool:
    """Whether the file name ends in ``.tar``, ``.tar.gz`` or ``.tgz`` (any case)."""
    return os.fspath(path).lower().endswith(ARCHIVE_SUFFIXES)


def member_path(archive: str, name: str) -> str:
    """``archive::name``: how a member is named in ``train.lst``, reports and failures."""
    return f"{archive}{ARCHIVE_SEP}{name}"


def split_member_path(text: str) -> tuple[str, str] | None:
    """``"a/x.tar.gz::train/n1/1.jpg"`` → ``("a/x.tar.gz", "train/n1/1.jpg")``; None when ``text`` names no member.

    The archive part ends at the first ``.tar::``, ``.tar.gz::`` or ``.tgz::`` (any case), so a ``::`` elsewhere in
    a folder name or inside the member name is kept as it is.
    """
    m = _SUFFIX_RE.search(text)
    if m is None:
        return None
    return text[: m.end() - len(ARCHIVE_SEP)], text[m.end() :]


def expand_braces(text: str) -> list[str]:
    """WebDataset's shard lists: ``shard-{000..009}.tar`` (zero padding kept) and ``{a,b}``; several groups
    expand as a product, left to right. Text without braces is returned as the one item."""
    m = re.search(r"\{([^{}]*)\}", text)
    if m is None:
        return [text]
    body, head, tail = m.group(1), text[: m.start()], text[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


@dataclass(frozen=True, slots=True)
class Member:
    """One regular-file member of an archive.

    Attributes:
        archive: absolute path of the archive file.
        name: member name, ``./`` removed (``train/n000002/0001_01.jpg``).
        size: data bytes; ``mtime_ns``: the header's modification time (what a resume compares, like a file's).
        offset: where the data starts in the uncompressed tar stream.
        ordinal: position of the member's header among all headers of the archive (stream order).
        stream: the archive is compressed: read it with :meth:`ArchiveReader.ordered`, not by offset.
    """

    archive: str
    name: str
    size: int
    mtime_ns: int
    offset: int
    ordinal: int
    stream: bool = False

    @property
    def path(self) -> str:
        return member_path(self.archive, self.name)


@dataclass
class ArchiveIndex:
    """What one header pass found (:func:`index_archive`).

    ``files``: regular members with safe names, one per name (the last copy), in stream order. ``dirs``: directory
    member names. ``meta``: the bytes of small members the caller asked for (WebDataset ``.cls``/``.json``).
    ``problem``: the archive is cut off or damaged after the listed members (they are still usable).
    """

    path: str
    compressed: bool
    files: list[Member] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _compression(path: str) -> str:
    """``"gzip"``, ``"bz2"``, ``"xz"`` or ``"none"`` from the magic bytes (not the name); zstd is refused."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise UserError(f"{path} is zstd-compressed, which Python's tarfile cannot read; decompress it first: "
                        f"zstd -d {path}, then pass the .tar")
    return "none"


def looks_like_archive(path: str) -> bool:
    """A tar or a compressed file by its content (for sources whose name does not say)."""
    try:
        return _compression(path) != "none" or tarfile.is_tarfile(path)
    except (UserError, OSError):
        return False


def _gzip_open(path: str):
    """A file object of the decompressed gzip stream. Stdlib zlib: ``bench_archive`` measured it against
    ``python-isal``'s igzip (see README, Archives) and decompression is far from the pipeline's bottleneck."""
    return gzip.open(path, "rb")


def _open_tar(path: str, stack: contextlib.ExitStack) -> tuple[tarfile.TarFile, bool]:
    """``(tarfile in a forward-only mode, compressed)``, closed with ``stack`` (the gzip stream too: tarfile leaves
    a file object it was given open); a file that is not a tar is a :class:`UserError`, with nothing left open."""
    kind = _compression(path)
    fileobj = _gzip_open(path) if kind == "gzip" else None
    # a plain tar seeks from header to header (data is never read); a compressed one is one forward stream
    mode = "r:" if kind == "none" else "r|" if fileobj else f"r|{kind}"
    try:
        tf = stack.enter_context(tarfile.open(path, fileobj=fileobj, mode=mode))  # noqa: SIM115 - stack closes it
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if fileobj is not None:
            fileobj.close()
        what = {"none": "", "gzip": "a gzip-compressed file, but its content is "}.get(kind, f"a {kind} file, but ")
        raise UserError(
            f"{path}: {what}not a tar archive ({e}); expected a .tar, .tar.gz or .tgz of <identity>/<image> "
            "members, a WebDataset shard, or a folder"
        ) from None
    if fileobj is not None:
        stack.callback(fileobj.close)
    return tf, kind != "none"


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def index_archive(path: str | os.PathLike, *, keep: Callable[[str], bool] | None = None) -> ArchiveIndex:
    """One pass over the archive's headers (see the module docstring); ``keep(name)``: also store that member's
    bytes (small members only) in :attr:`ArchiveIndex.meta`.

    Raises :class:`UserError` for a file that is missing or not a tar; a cut-off or damaged archive is not an
    error: what came before the damage is listed and ``problem`` says where it ended.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.isfile(p):
        raise UserError(f"{p}: no such archive" if not os.path.exists(p) else f"{p} is not a regular file")
    file_size = os.path.getsize(p)
    with contextlib.ExitStack() as stack:
        tf, compressed = _open_tar(p, stack)
        idx = ArchiveIndex(p, compressed)
        where: dict[str, int] = {}  # name -> position in idx.files
        ordinal = 0
        last = None
        while True:
            try:
                ti = tf.next()
            except _READ_ERRORS as e:
                after = f"after member {last!r}" if last else "before its first member"
                cut = "ends early" if isinstance(e, EOFError) or "unexpected end" in str(e) else "is damaged"
                idx.problem = (
                    f"{TRUNCATED}: the archive {cut} {after} ({e}); the complete members before that are used, "
                    "any after it are missing"
                )
                break
            if ti is None:
                break
            tf.members.clear()  # tarfile keeps every header otherwise (~0.5 KB each: 1.5 GB for VGGFace2)
            k, ordinal = ordinal, ordinal + 1
            name = _norm(ti.name)
            shown = member_path(p, ti.name)
            if not name or name == ".":
                continue
            last = ti.name
            if _unsafe(ti.name):
                idx.skipped.append((shown, "unsafe member path: absolute or with '..', it would land outside the "
                                           "archive's folder (tar -x refuses it too); not read"))
                continue
            if ti.isdir():
                idx.dirs.add(name)
                continue
            if ti.issym() or ti.islnk():
                idx.skipped.append((shown, f"link member (-> {ti.linkname}): links in archives are not followed"))
                continue
            if ti.type == tarfile.GNUTYPE_SPARSE or not ti.isreg():
                what = "sparse file" if ti.type == tarfile.GNUTYPE_SPARSE else "device, FIFO or other special member"
                idx.skipped.append((shown, f"unreadable: not a regular file ({what})"))
                continue
            m = Member(p, name, ti.size, int(ti.mtime * 1e9), ti.offset_data, k, compressed)
            if name in where:
                old = idx.files[where[name]]
                idx.skipped.append((
                    f"{old.path} (member #{old.ordinal + 1})",
                    f"duplicate member name: member #{k + 1} of the same name replaces it, as tar -x would",
                ))
                idx.files[where[name]] = m
            else:
                where[name] = len(idx.files)
                idx.files.append(m)
            if keep is not None and ti.size <= _SMALL_META and keep(name):
                try:
                    f = tf.extractfile(ti)
                    idx.meta[name] = f.read() if f is not None else b""
                except _READ_ERRORS:
                    pass  # reported as the archive's problem by the next header read
    if not compressed and idx.files:
        end = max(m.offset + m.size for m in idx.files)
        if end > file_size and idx.problem is None:
            idx.problem = f"{TRUNCATED}: the archive is cut off ({file_size} bytes, its members need {end})"
    idx.files.sort(key=lambda m: m.ordinal)  # a replaced duplicate keeps the later copy's position
    return idx


# ----------------------------------------------------------------------------------------------------------------
# Layouts: one archive of [prefix/]<identity>/<image>, or WebDataset shards


@dataclass
class ArchiveScan:
    """What a scan of archives found, like :class:`packer.scan.ScanResult`.

    ``entries``: ``(identity, member)`` grouped by identity in label order; ``identities``: the kept identity
    names, label order; ``skipped``: ``(path, reason)``; ``problems``: archive-level problems (cut off).
    """

    entries: list[tuple[str, Member]] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _common_root(names: list[str]) -> list[str]:
    """The folder the identity folders are in: the files' common folder, backed off until files sit two levels
    (``<identity>/<image>``) below it; hidden names (``._x`` from macOS tar) do not count."""
    split = [n.split("/") for n in names if not any(part.startswith(".") for part in n.split("/"))]
    if not split:
        return []
    common = split[0][:-1]
    for parts in split[1:]:
        n = 0
        while n < len(common) and n < len(parts) - 1 and parts[n] == common[n]:
            n += 1
        common = common[:n]
    while common and not any(len(parts) - len(common) >= 2 for parts in split):
        common = common[:-1]
    return common


def _finish(groups: dict[str, list[tuple[str, Member]]], min_images: int, res: ArchiveScan, shown) -> ArchiveScan:
    """Identities in label order (:func:`packer.scan.identity_order`), photos sorted by file name inside each,
    small identities left out: exactly the rules of :func:`packer.scan.scan_folder`."""
    for ident in identity_order(list(groups)):
        photos = sorted(groups[ident], key=lambda t: (t[0], t[1].name))
        if len(photos) < max(min_images, 1):
            why = f"fewer than min_images={min_images} images (identity has {len(photos)})"
            res.skipped.append((shown(ident), why if photos else "no images in this identity folder"))
            continue
        res.identities.append(ident)
        res.entries.extend((ident, m) for _, m in photos)
    return res


def scan_archive(
    idx: ArchiveIndex, *, root: str | None = None, exts: Iterable[str] = (".jpg", ".jpeg", ".png"), min_images: int = 1
) -> ArchiveScan:
    """One archive as ``[root/]<identity>/<image>``, with :func:`packer.scan.scan_folder`'s rules and reasons.

    ``root``: the folder inside the archive that holds the identity folders (``x.tar.gz::train``); default: the
    members' common folder (``train`` for VGGFace2's ``train/n000002/0001_01.jpg``).
    """
    want = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)
    res = ArchiveScan()
    if idx.problem:
        res.problems.append((idx.path, idx.problem))
    res.skipped.extend(idx.skipped)
    if root is not None:
        base = [p for p in _norm(root).split("/") if p]
        files = [m for m in idx.files if m.name.split("/")[: len(base)] == base]
        dirs = {d for d in idx.dirs if d.split("/")[: len(base)] == base}
        if not files:
            raise UserError(f"{member_path(idx.path, root)}: no member of the archive lies in that folder")
    else:
        files, dirs = idx.files, idx.dirs
        base = _common_root([m.name for m in files])
    n = len(base)
    prefix = "/".join(base) + "/" if base else ""
    if unlistable(prefix):
        raise UserError(f"{member_path(idx.path, prefix)!r}: {BAD_PATH}, so none of its members can be listed")

    def shown(*parts: str) -> str:
        return member_path(idx.path, prefix + "/".join(parts))

    groups: dict[str, list[tuple[str, Member]]] = {}
    nested: set[str] = set()
    hidden: set[str] = set()
    for d in dirs:  # identity folders without any file still count as (empty) identities, as on disk
        parts = d.split("/")[n:]
        if len(parts) == 1 and parts[0] and not parts[0].startswith(".") and not unlistable(parts[0]):
            groups.setdefault(parts[0], [])
    for m in files:
        parts = m.name.split("/")[n:]
        if len(parts) == 1:
            res.skipped.append((m.path, "hidden" if parts[0].startswith(".") else "not inside an identity folder"))
            continue
        ident, fname = parts[0], parts[-1]
        if ident.startswith("."):
            if ident not in hidden:
                hidden.add(ident)
                res.skipped.append((shown(ident), "hidden"))
            continue
        if unlistable(ident):
            if ident not in hidden:
                hidden.add(ident)
                res.skipped.append((shown(ident), BAD_PATH))
            continue
        groups.setdefault(ident, [])
        if len(parts) > 2:
            sub = "/".join(parts[:2])
            if sub not in nested:
                nested.add(sub)
                res.skipped.append((shown(*parts[:2]), "folder inside an identity folder (not scanned)"))
            continue
        if fname.startswith("."):
            res.skipped.append((m.path, "hidden"))
        elif unlistable(fname):
            res.skipped.append((m.path, BAD_PATH))
        elif os.path.splitext(fname)[1].lower() not in want:
            ext = os.path.splitext(fname)[1] or "no extension"
            res.skipped.append((m.path, f"not an image ({ext}; looking for {', '.join(want)})"))
        else:
            groups[ident].append((fname, m))
    return _finish(groups, min_images, res, shown)


def wds_split(name: str) -> tuple[str, str]:
    """WebDataset's sample key and extension: ``dir/0001_01.seg.jpg`` → ``("dir/0001_01", "seg.jpg")``."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def wds_meta_member(name: str) -> bool:
    """Members whose bytes the WebDataset scan needs at index time (``.cls``, ``.json``)."""
    return wds_split(name)[1].lower() in ("cls", "json")


def _identity_name(text: str) -> str | None:
    """``text`` stripped, if it can name an identity: an identity is a folder name (``--save-crops`` writes
    ``<identity>/<crop>``), so no ``/``, tab or newline, and not ``.`` or ``..``."""
    text = text.strip()
    return text if text not in ("", ".", "..") and "/" not in text and not unlistable(text) else None


def _wds_identity(sample: dict[str, Member], key: str, meta: dict[str, bytes]) -> str | None:
    for ext, m in sample.items():
        if ext.lower() == "cls" and m.name in meta:
            ident = _identity_name(meta[m.name].decode("utf-8", "replace"))
            if ident is not None:
                return ident
    for ext, m in sample.items():
        if ext.lower() == "json" and m.name in meta:
            try:
                doc = json.loads(meta[m.name])
            except ValueError:
                continue
            if isinstance(doc, dict):
                for k in _WDS_JSON_KEYS:
                    v = doc.get(k)
                    if isinstance(v, (str, int)) and not isinstance(v, bool) and _identity_name(str(v)) is not None:
                        return _identity_name(str(v))
    folder = key.rpartition("/")[0]
    return folder.rpartition("/")[2] or None


def scan_webdataset(indexes: Sequence[ArchiveIndex], *, min_images: int = 1) -> ArchiveScan:
    """WebDataset shards: members grouped into samples by key (the name up to the basename's first dot); a
    sample's photo is its ``jpg``/``jpeg``/``png`` member (also ``x.jpg``: the extension's last part counts); its
    identity is the ``.cls`` member's text, else a ``.json`` member's ``identity``/``cls``/``label``/``class``
    field, else the last folder of the key (``n000002/0001_01`` → ``n000002``). Identities and photo order as
    for the extracted folder ``<identity>/<photo file name>``."""
    res = ArchiveScan()
    groups: dict[str, list[tuple[str, Member]]] = {}
    for idx in indexes:
        if idx.problem:
            res.problems.append((idx.path, idx.problem))
        res.skipped.extend(idx.skipped)
        samples: dict[str, dict[str, Member]] = {}
        for m in idx.files:
            key, ext = wds_split(m.name)
            samples.setdefault(key, {})[ext] = m
        for key, sample in samples.items():
            images = [m for ext, m in sample.items() if ext.lower().rpartition('.')[2] in _WDS_IMAGE_EXTS]
            if not images:
                if not any(ext.lower() in ("cls", "json") for ext in sample) or len(sample) > 1:
                    first = next(iter(sample.values()))
                    exts = ", ".join(sorted(sample))
                    res.skipped.append((first.path, f"not an image (sample {key!r} has {exts}; looking for jpg, "
                                                    "jpeg, png)"))
                continue
            if unlistable(images[0].path):
                res.skipped.append((images[0].path, BAD_PATH))
                continue
            ident = _wds_identity(sample, key, idx.meta)
            if ident is None:
                res.skipped.append((images[0].path, "no identity: the sample has no .cls or .json member and its "
                                                    "key no folder"))
                continue
            for m in images[1:]:
                res.skipped.append((m.path, f"second image of sample {key!r} (the first, {images[0].name}, is used)"))
            groups.setdefault(ident, []).append((images[0].name.rpartition("/")[2], images[0]))
    return _finish(groups, min_images, res, lambda ident: f"identity {ident}")


# ----------------------------------------------------------------------------------------------------------------
# Reading



def shard_list(s: str) -> list[str] | None:
    """WebDataset shards named by ``s``: a brace list (``shards-{000..009}.tar``), or a folder holding archives
    and no sub-folders; None when ``s`` is neither."""
    if "{" in s and "}" in s and not os.path.exists(s):
        names = expand_braces(s)
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise UserError(f"{s}: {len(missing)} of {len(names)} shards do not exist (first: {missing[0]})")
        return names
    if os.path.isdir(s):
        with os.scandir(s) as it:
            entries = [d for d in it if not d.name.startswith(".")]
        if entries and not any(_maybe_folder(d) for d in entries):
            shards = sorted(d.path for d in entries if is_archive_name(d.name))
            return shards or None
    return None


def _maybe_folder(entry: os.DirEntry) -> bool:
    """A sub-folder, or an entry that cannot be told (a symlink loop): either way not a folder of shards only."""
    try:
        return entry.is_dir()
    except OSError:
        return True


def names_archives(s: str) -> bool:
    """Whether SRC ``s`` names archives: WebDataset shards (:func:`shard_list`), ``x.tar.gz::folder``, or a file
    that is a tar by its name or content (a ``.lst`` never is). Anything else is a folder or a ``.lst``."""
    if shard_list(s) is not None or split_member_path(s) is not None:
        return True
    return os.path.isfile(s) and not s.lower().endswith(".lst") and (is_archive_name(s) or looks_like_archive(s))


def scan_archive_source(
    s: str, *, exts: Iterable[str] = (".jpg", ".jpeg", ".png"), min_images: int = 1
) -> tuple[str, str, ArchiveScan]:
    """``(kind, root, scan)`` of a SRC that :func:`names_archives`: kind ``"archive"`` or ``"webdataset"`` (a
    single tar whose samples carry a ``.cls``, or shards), ``root`` as reports name it, and the scan with
    :func:`packer.scan.scan_folder`'s rules (the labels and order of the extracted folder)."""
    shards = shard_list(s)
    ref = split_member_path(s)
    path, root = ref if ref is not None else (s, None)
    for p in shards or [path]:
        if unlistable(os.path.abspath(p)):
            raise UserError(f"{os.path.abspath(p)!r}: {BAD_PATH}, so none of its members can be listed; rename or "
                            "move the archive")
    if shards is not None:
        indexes = [index_archive(p, keep=wds_meta_member) for p in shards]
        return "webdataset", os.path.abspath(s), scan_webdataset(indexes, min_images=min_images)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such archive")
    idx = index_archive(path, keep=wds_meta_member)
    if any(wds_split(m.name)[1].lower() == "cls" for m in idx.files):  # samples carry a class: WebDataset
        return "webdataset", idx.path, scan_webdataset([idx], min_images=min_images)
    scan = scan_archive(idx, root=root, exts=exts, min_images=min_images)
    if not scan.entries and root is None:
        raise UserError(
            f"{s}: no <identity>/<image> photos found in the archive; if they lie in a sub-folder of it, name that "
            f"folder: {s}::<folder> (e.g. vggface2_train.tar.gz::train)"
        )
    return "archive", member_path(idx.path, root) if root else idx.path, scan


def reorder_bytes(members: Iterable[Member | None]) -> dict[str, int]:
    """Per compressed-stream archive: the most bytes :meth:`ArchiveReader.ordered` holds at once when asked for
    ``members`` in this order (members that the stream passes before their turn wait in memory).

    Exact for a single archive, from the index alone: a stream walk in header order, holding each wanted member
    until everything asked for before it has been handed out.
    """
    by_archive: dict[str, list[Member]] = {}
    for m in members:
        if m is not None:
            by_archive.setdefault(m.archive, []).append(m)
    need: dict[str, int] = {}
    for archive, ms in by_archive.items():
        turn = {m.ordinal: k for k, m in enumerate(ms)}  # request position of each wanted header
        size = {m.ordinal: m.size for m in ms}
        held: dict[int, int] = {}  # request position -> bytes, members read before their turn
        nxt = held_bytes = peak = 0
        for ordinal in sorted(turn):
            pos = turn[ordinal]
            if pos != nxt:
                held[pos] = size[ordinal]
                held_bytes += size[ordinal]
                peak = max(peak, held_bytes)
                continue
            nxt += 1
            while nxt in held:
                held_bytes -= held.pop(nxt)
                nxt += 1
        need[archive] = peak
    return need


class _Cursor:
    """A forward-only read of one compressed archive: members handed out by ordinal, early ones held."""

    def __init__(self, path: str, wanted: dict[int, Member], max_bytes: int):
        self.path = path
        self._stack = contextlib.ExitStack()
        self.tf, _ = _open_tar(path, self._stack)
        self.wanted = wanted
        self.max_bytes = max_bytes
        self.held: dict[int, bytes | ImageError] = {}
        self.ordinal = 0
        self.error: str | None = None

    def _take(self, ti: tarfile.TarInfo, m: Member) -> bytes | ImageError:
        if _norm(ti.name) != m.name or ti.size != m.size:
            return ImageError(UNREADABLE, f"the archive changed since it was scanned (found {ti.name!r} here)")
        if m.size > self.max_bytes:
            return ImageError(TOO_LARGE, f"member is {m.size / 2**20:.1f} MiB (limit {self.max_bytes / 2**20:.0f} MiB)")
        try:
            f = self.tf.extractfile(ti)
            return f.read() if f is not None else b""
        except _READ_ERRORS as e:
            self.error = f"the archive ends early inside this member ({e})"
            return ImageError(TRUNCATED, self.error)

    def get(self, m: Member) -> bytes | ImageError:
        got = self.held.pop(m.ordinal, None)
        if got is not None:
            return got
        while self.error is None:
            try:
                ti = self.tf.next()
            except _READ_ERRORS as e:
                self.error = f"the archive ends early before this member ({e})"
                break
            if ti is None:
                self.error = "the archive ended before this member (it changed since it was scanned?)"
                break
            self.tf.members.clear()
            k, self.ordinal = self.ordinal, self.ordinal + 1
            want = self.wanted.get(k)
            if want is None:
                continue
            data = self._take(ti, want)
            if k == m.ordinal:
                return data
            self.held[k] = data
        return ImageError(TRUNCATED if "ends early" in (self.error or "") else UNREADABLE, self.error or "")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()


class ArchiveReader:
    """Reads member bytes. ``max_bytes``: a bigger member fails as ``too large`` (never read whole). Close it
    (or use ``with``) to release the archives' file descriptors."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, archive: str) -> int:
        with self._lock:
            fd = self._fds.get(archive)
            if fd is None:
                fd = self._fds[archive] = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
            return fd

    def read(self, m: Member) -> bytes:
        """A member of a plain ``.tar``, by offset (any thread, any order); raises :class:`ImageError`."""
        if m.size > self.max_bytes:
            raise ImageError(TOO_LARGE, f"member is {m.size / 2**20:.1f} MiB (limit {self.max_bytes / 2**20:.0f} MiB)")
        try:
            data = os.pread(self._fd(m.archive), m.size, m.offset)
        except OSError as e:
            raise ImageError(UNREADABLE, e.strerror or type(e).__name__) from None
        if len(data) < m.size:
            raise ImageError(TRUNCATED, f"the archive is cut off inside this member ({len(data)} of {m.size} bytes)")
        return data

    def ordered(self, members: Sequence[Member]) -> Iterator[bytes | ImageError]:
        """The bytes of ``members`` (of compressed archives; several may interleave), in the order given; a member
        that cannot be read comes as its :class:`ImageError`. Check :func:`reorder_bytes` first: held members stay
        in memory."""
        wanted: dict[str, dict[int, Member]] = {}
        for m in members:
            wanted.setdefault(m.archive, {})[m.ordinal] = m
        cursors: dict[str, _Cursor] = {}
        try:
            for m in members:
                cur = cursors.get(m.archive)
                if cur is None:
                    try:
                        cur = cursors[m.archive] = _Cursor(m.archive, wanted[m.archive], self.max_bytes)
                    except UserError as e:  # replaced by a non-tar since the scan
                        yield ImageError(UNREADABLE, str(e))
                        continue
                yield cur.get(m)
        finally:
            for cur in cursors.values():
                cur.close()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetched(items: Iterable, depth: int) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` ahead: decompressing the next members overlaps
    with the caller's work. An exception in the producer is re-raised in the consumer; closing the consumer stops
    the producer at its next item, and the producer then closes ``items`` (a generator's ``finally`` runs there,
    e.g. :meth:`ArchiveReader.ordered` closing its archives)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(x: tuple[bool, object]) -> bool:
        """Hand ``x`` over unless the consumer has gone (then never block on a full queue)."""
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((True, end))
        except BaseException as e:  # handed to the consumer
            put((False, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, name="archive-read", daemon=True)
    t.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is end:
                return
            yield x
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        t.join(timeout=5)
