"""dir2lst: a ``root/<identity>/<image>`` folder to ``.lst`` entries with contiguous labels.

Identities are the immediate sub-folders of ``root`` in sorted order (Python ``str`` order, so unicode names are
fine and the result does not depend on the locale), except that when every identity folder name is a plain
non-negative integer (``0``, ``1``, …, ``10``: what ``gpu-align unpack`` writes) they are sorted by number, so
``unpack`` → ``lst`` → ``pack`` keeps every label. Zero-padded names of one width sort the same either way, so
names like CASIA-WebFace's ``0000045`` keep the labels they always had. Images inside each folder are sorted in
``str`` order. Only the extensions in ``exts`` count (case-insensitive).

Everything else is reported in ``skipped`` with a reason, never silently dropped and never an abort: hidden files,
other file types, files directly in ``root``, nested folders, identities with fewer than ``min_images`` images,
names that a ``.lst`` line cannot hold (``path contains a tab/newline``), and entries that cannot be read
(``unreadable: ...``: broken links, symlink loops, links through a file, over-long names, permission denied,
FIFOs/devices/sockets). A ``root`` whose own path holds a tab or newline is an error: no line could hold any of its
files.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from packer.errors import UserError
from packer.lst import LstEntry, unlistable

__all__ = ["BAD_PATH", "DEFAULT_EXTS", "ScanResult", "identity_order", "scan_folder"]

DEFAULT_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class ScanResult:
    """What :func:`scan_folder` found.

    Attributes:
        entries: one per image, grouped by identity; ``label`` is contiguous 0..C-1 over kept identities.
        identities: kept identity folder names; ``identities[label]`` is that label's folder.
        skipped: ``(path, reason)`` for every file/folder not used (paths styled like ``entries``' paths).
    """

    entries: list[LstEntry] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


BAD_PATH = "path contains a tab/newline (a tab-separated .lst line cannot hold it)"
_INTEGER = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit() also takes "²" and other scripts' digits)

_UNREADABLE = {  # errno of a failed stat -> why the entry cannot be used
    errno.ENOENT: "broken link (its target does not exist)",
    errno.ELOOP: "symlink loop",
    errno.ENOTDIR: "link through a file (a path component is not a folder)",
    errno.ENAMETOOLONG: "name or link target too long",
    errno.EACCES: "permission denied",
}


def _scandir_sorted(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda d: d.name)


def _kind(entry: os.DirEntry) -> tuple[str, str | None]:
    """``("dir" | "file" | "other", None)`` following links, or ``("bad", reason)`` when the entry cannot be stat'ed."""
    try:
        mode = entry.stat().st_mode  # follows symlinks; ELOOP, ENOTDIR, ENAMETOOLONG, ... raise here
    except OSError as e:
        why = _UNREADABLE.get(e.errno, e.strerror or type(e).__name__)
        return "bad", f"unreadable: {why}"
    if stat.S_ISDIR(mode):
        return "dir", None
    return ("file", None) if stat.S_ISREG(mode) else ("other", "unreadable: not a regular file")


def identity_order(names: list[str]) -> list[str]:
    """Identity folders in label order: by number when every name is a plain non-negative integer, else ``str``."""
    if names and all(_INTEGER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def scan_folder(
    root: str | os.PathLike,
    *,
    exts: Iterable[str] = DEFAULT_EXTS,
    min_images: int = 1,
    aligned: int = 1,
    absolute: bool = True,
) -> ScanResult:
    """List ``root/<identity>/<image>`` as ``.lst`` entries.

    Args:
        root: dataset folder; a missing or unreadable root is a :class:`UserError`.
        exts: image extensions with the dot, matched case-insensitively.
        min_images: identities with fewer images are left out (reported in ``skipped``) and get no label.
        aligned: the ``aligned`` field of every entry (1: crops stored as-is; 0: photos to detect and align).
        absolute: absolute paths (default) or paths relative to ``root``.
    """
    root_s = os.fspath(root)
    if not os.path.exists(root_s):
        raise UserError(f"{root_s}: no such folder")
    if not os.path.isdir(root_s):
        raise UserError(f"{root_s} is not a folder (expected root/<identity>/<image>)")
    want = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)
    base = os.path.abspath(root_s)
    if absolute and unlistable(base):
        raise UserError(f"{base!r}: {BAD_PATH}, so none of its files can be listed; rename or move the folder")

    def show(*parts: str) -> str:
        return os.path.join(base, *parts) if absolute else os.path.join(*parts)

    try:
        top = _scandir_sorted(root_s)
    except OSError as e:
        raise UserError(f"{root_s}: cannot list folder ({e.strerror})") from None
    res = ScanResult()
    idents: dict[str, os.DirEntry] = {}
    for ident in top:
        name = ident.name
        if name.startswith("."):
            res.skipped.append((show(name), "hidden"))
            continue
        kind, why = _kind(ident)
        if kind == "bad":
            res.skipped.append((show(name), why))
        elif kind != "dir":
            res.skipped.append((show(name), "not inside an identity folder"))
        elif unlistable(name):
            res.skipped.append((show(name), BAD_PATH))
        else:
            idents[name] = ident
    for name in identity_order(list(idents)):
        try:
            children = _scandir_sorted(idents[name].path)
        except OSError as e:
            why = _UNREADABLE.get(e.errno, e.strerror or type(e).__name__)
            res.skipped.append((show(name), f"unreadable: cannot list folder ({why})"))
            continue
        images: list[str] = []
        for child in children:
            cname = child.name
            rel = show(name, cname)
            if cname.startswith("."):
                res.skipped.append((rel, "hidden"))
                continue
            if unlistable(cname):
                res.skipped.append((rel, BAD_PATH))
                continue
            kind, why = _kind(child)
            if kind == "bad":
                res.skipped.append((rel, why))
            elif kind == "dir":
                res.skipped.append((rel, "folder inside an identity folder (not scanned)"))
            elif os.path.splitext(cname)[1].lower() not in want:
                ext = os.path.splitext(cname)[1] or "no extension"
                res.skipped.append((rel, f"not an image ({ext}; looking for {', '.join(want)})"))
            elif kind != "file":
                res.skipped.append((rel, why))
            else:
                images.append(rel)
        if len(images) < max(min_images, 1):
            why = f"fewer than min_images={min_images} images (identity has {len(images)})"
            res.skipped.append((show(name), why if images else "no images in this identity folder"))
            continue
        label = len(res.identities)
        res.identities.append(name)
        res.entries.extend(LstEntry(aligned, p, label) for p in images)
    return res
