"""dir2lst: a ``root/<identity>/<image>`` folder to ``.lst`` entries with contiguous labels.

Identities are the immediate sub-folders of ``root`` in sorted order (Python ``str`` order, so unicode names are
fine and the result does not depend on the locale); images inside each are sorted the same way. Only the
extensions in ``exts`` count (case-insensitive). Everything else is reported in ``skipped`` with a reason, never
silently dropped: hidden files, other file types, files directly in ``root``, nested folders, identities with
fewer than ``min_images`` images, and names that a ``.lst`` line cannot hold (tab/newline).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from packer.errors import UserError
from packer.lst import LstEntry

__all__ = ["DEFAULT_EXTS", "ScanResult", "scan_folder"]

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


def _bad_name(name: str) -> bool:
    return any(c in name for c in "\t\n\r")


def _scandir_sorted(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda d: d.name)


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

    def show(*parts: str) -> str:
        return os.path.join(base, *parts) if absolute else os.path.join(*parts)

    try:
        top = _scandir_sorted(root_s)
    except OSError as e:
        raise UserError(f"{root_s}: cannot list folder ({e.strerror})") from None
    res = ScanResult()
    for ident in top:
        name = ident.name
        if name.startswith("."):
            res.skipped.append((show(name), "hidden"))
            continue
        if not ident.is_dir():
            res.skipped.append((show(name), "not inside an identity folder"))
            continue
        if _bad_name(name):
            res.skipped.append((show(name), "folder name holds a tab or newline, which a .lst line cannot hold"))
            continue
        try:
            children = _scandir_sorted(ident.path)
        except OSError as e:
            res.skipped.append((show(name), f"cannot list folder: {e.strerror}"))
            continue
        images: list[str] = []
        for child in children:
            cname = child.name
            rel = show(name, cname)
            if cname.startswith("."):
                res.skipped.append((rel, "hidden"))
            elif child.is_dir():
                res.skipped.append((rel, "folder inside an identity folder (not scanned)"))
            elif os.path.splitext(cname)[1].lower() not in want:
                kind = os.path.splitext(cname)[1] or "no extension"
                res.skipped.append((rel, f"not an image ({kind}; looking for {', '.join(want)})"))
            elif not child.is_file():
                res.skipped.append((rel, "not a regular file (broken link?)"))
            elif _bad_name(cname):
                res.skipped.append((rel, "file name holds a tab or newline, which a .lst line cannot hold"))
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
