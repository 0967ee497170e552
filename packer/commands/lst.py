"""``gpu-align lst``: a ``root/<identity>/<image>`` folder to a face2rec2 ``.lst`` (InsightFace's dir2lst)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

from packer.archive import member_path, names_archives, scan_archive_source, split_member_path
from packer.cli import add_command
from packer.errors import UserError
from packer.fsutil import atomic_write
from packer.lst import LST_ENCODING, LST_ERRORS, LstEntry, format_lst_line, unlistable
from packer.scan import BAD_PATH, DEFAULT_EXTS, scan_folder

EPILOG = """\
examples:
  gpu-align lst data/faces -o data/train.lst
      one line per image: 1<TAB>/abs/path/data/faces/alice/001.jpg<TAB>0
  gpu-align lst data/faces -o data/train.lst --relative --min-images 5
      paths relative to data/ (where train.lst is); identities with < 5 images left out
  gpu-align lst photos/ -o photos.lst --aligned 0
      raw photos, for `gpu-align run photos.lst` (detect + align)
  gpu-align lst data/faces -o -          write the list to stdout (summary goes to stderr)
  gpu-align lst vggface2_train.tar.gz -o train.lst --aligned 0
      the archive's photos, read without extracting: 0<TAB>/abs/vggface2_train.tar.gz::train/n000002/0001_01.jpg<TAB>0

Identities are ROOT's sub-folders in sorted order and get labels 0..C-1 in that order: by number when every
identity folder name is a plain non-negative integer (0, 1, ..., 10, as `gpu-align unpack` writes them, so
unpack -> lst -> pack keeps the labels), otherwise in string order. Images in each folder are sorted (string order).
Hidden files, other extensions, files directly in ROOT, nested folders, identities below --min-images, names with
a tab or newline (a .lst line cannot hold them) and entries that cannot be read (broken links, symlink loops,
links through a file, over-long names, permission denied, FIFOs and devices) are skipped and counted in the
summary (listed unless --quiet); none of them stops the listing. A ROOT whose path holds a tab or newline is refused.
"""


def _kind(reason: str) -> str:
    return re.split(r"[(:]", reason)[0].strip()


def _write(args: argparse.Namespace, text: str) -> None:
    """The .lst text to ``args.output`` (atomically) or stdout (``-``)."""
    if args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        atomic_write(args.output, text.encode(LST_ENCODING, LST_ERRORS))
    except OSError as e:
        raise UserError(f"cannot write {args.output}: {e.strerror}") from None


def _list_skipped(skipped: list[tuple[str, str]], info) -> None:
    for path, reason in skipped[:20]:
        print(f"  skipped {path}: {reason}", file=info)
    if len(skipped) > 20:
        print(f"  … and {len(skipped) - 20} more", file=info)


def _run_archive(args: argparse.Namespace) -> int:
    """``ROOT`` is a ``.tar``/``.tar.gz`` (``::folder``) or WebDataset shards: one line per member photo, named
    ``ARCHIVE::MEMBER`` (``--relative``: the archive's path relative to the .lst's folder)."""
    to_stdout = args.output == "-"
    _, root, scan = scan_archive_source(args.root, exts=args.exts, min_images=args.min_images)
    if not scan.entries:
        raise UserError(f"no images found in {args.root} (expected [folder/]<identity>/<image> members)")
    base = os.getcwd() if to_stdout else os.path.dirname(os.path.abspath(args.output))
    label = {ident: k for k, ident in enumerate(scan.identities)}
    entries = []
    for ident, m in scan.entries:
        path = m.path
        if args.relative:
            archive, member = split_member_path(path)
            path = member_path(os.path.relpath(archive, base), member)
        entries.append(LstEntry(args.aligned, path, label[ident]))
    _write(args, "".join(format_lst_line(e) + "\n" for e in entries))
    skipped = [*scan.problems, *scan.skipped]
    info = sys.stderr if to_stdout else sys.stdout
    where = "stdout" if to_stdout else args.output
    msg = f"{where}: {len(scan.identities)} identities, {len(entries)} images from {root} (aligned={args.aligned})"
    print(msg + (f"; skipped {len(skipped)}" if skipped else "; nothing skipped"), file=info)
    if not args.quiet:
        _list_skipped(skipped, info)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.min_images < 1:
        raise UserError(f"--min-images must be at least 1, got {args.min_images}")
    # A ROOT whose absolute path holds a tab/newline is refused by the scan; with --relative only the part of it that
    # the lines would hold counts (none when the .lst sits inside ROOT), so scan relative to ROOT then.
    absolute = not (args.relative and unlistable(os.path.abspath(args.root)))
    if names_archives(args.root):
        return _run_archive(args)
    res = scan_folder(args.root, exts=args.exts, min_images=args.min_images, aligned=args.aligned, absolute=absolute)
    to_stdout = args.output == "-"
    kinds = Counter(_kind(r) for _, r in res.skipped)
    skipped_msg = f"skipped {len(res.skipped)}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if not res.entries:
        hint = f"; {skipped_msg}" if res.skipped else ""
        raise UserError(
            f"no images found under {args.root} (expected ROOT/<identity>/<image> with extensions "
            f"{' '.join(args.exts)}){hint}"
        )
    base = os.getcwd() if to_stdout else os.path.dirname(os.path.abspath(args.output))
    entries = res.entries
    if args.relative:
        prefix = os.path.relpath(os.path.abspath(args.root), base)
        if unlistable(prefix):
            raise UserError(f"{prefix!r} (ROOT relative to the .lst's folder): {BAD_PATH}; rename or move the folder")
        if absolute:
            entries = [e.with_path(os.path.relpath(e.path, base)) for e in entries]
        else:
            entries = [e.with_path(os.path.normpath(os.path.join(prefix, e.path))) for e in entries]
    text = "".join(format_lst_line(e) + "\n" for e in entries)
    _write(args, text)
    info = sys.stderr if to_stdout else sys.stdout
    where = "stdout" if to_stdout else args.output
    style = f"paths relative to {base}" if args.relative else "absolute paths"
    msg = f"{where}: {len(res.identities)} identities, {len(entries)} images ({style}, aligned={args.aligned})"
    print(msg + (f"; {skipped_msg}" if res.skipped else "; nothing skipped"), file=info)
    if not args.quiet:
        _list_skipped(res.skipped, info)
    return 0


HELP = "make a face2rec2 .lst from a root/<identity>/<image> folder (dir2lst)"
DESCRIPTION = (
    "List a dataset folder (root/<identity>/<image>) as a face2rec2 .lst: one "
    "'aligned<TAB>path<TAB>label' line per image, identities in sorted folder order (numeric when every name is "
    "a number) with labels 0..C-1. "
    "The result feeds `gpu-align pack` (aligned crops) or `gpu-align run` (photos) and InsightFace's face2rec2."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "lst", HELP, DESCRIPTION, EPILOG)
    p.add_argument(
        "root",
        metavar="ROOT",
        help="dataset folder ROOT/<identity>/<image>, or a .tar/.tar.gz[::folder] of it, or WebDataset shards "
        "(lines then name ARCHIVE::MEMBER)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="LST", help="the .lst to write (replaced atomically); '-' = stdout"
    )
    p.add_argument(
        "--min-images",
        type=int,
        default=1,
        metavar="N",
        help="leave out identities with fewer than N images (default: 1)",
    )
    p.add_argument(
        "--relative",
        action="store_true",
        help="write paths relative to the .lst's folder (default: absolute paths, which work from any directory, "
        "also with face2rec2; `gpu-align pack` reads relative paths from the .lst's folder)",
    )
    p.add_argument(
        "--aligned",
        type=int,
        choices=(0, 1),
        default=1,
        help="first field of every line: 1 = images are aligned crops (default), 0 = photos to detect and align",
    )
    p.add_argument(
        "--exts",
        nargs="+",
        default=list(DEFAULT_EXTS),
        metavar="EXT",
        help=f"image extensions, case-insensitive (default: {' '.join(DEFAULT_EXTS)})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the one-line summary")
    p.set_defaults(func=_run)
