"""``gpu-align pack``: aligned face crops listed in a face2rec2 ``.lst`` to a RecordIO dataset (face2rec2, aligned=1).

The image bytes are stored as they are (no re-encode), like face2rec2 does for aligned lines. Each file is checked
first: a regular file of at most 64 MiB (a FIFO or a device is never opened in a blocking way), a JPEG/PNG header,
the ``--image-size`` pixel size, and one strict decode (the check ``verify`` makes), so a truncated or corrupt crop
is skipped instead of stored; failures are listed in ``report.json``. Lines whose landmarks are bad
(``packer.lst.landmark_problem``) are skipped and reported too. A ``.lst`` of photos (aligned=0) needs alignment:
``gpu-align pack`` hands it to the aligner (``args.aligner``, from ``gpu_align``); ``python -m packer pack``, which
never imports torch, refuses it. In a ``.lst`` that mixes both kinds, the photo lines are skipped and reported.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import simplejpeg

from packer.archive import split_member_path
from packer.cli import add_command
from packer.errors import UserError
from packer.fsutil import atomic_write
from packer.imageinfo import ImageError, NotRegularFileError, TooBigError, image_format, probe_image, read_regular_file
from packer.layout import LABEL_STYLES, LAYOUTS, DatasetWriter, PackItem, WriteSummary
from packer.lst import LstEntry, read_lst
from packer.reader import decode_image
from packer.report_html import write_report_html_or_warn

EPILOG = """\
examples:
  gpu-align lst data/faces -o data/train.lst && gpu-align pack data/train.lst --out data/faces_rec
      InsightFace layout, scalar labels: train.rec/.idx/.lst, property, report.json in data/faces_rec
  gpu-align pack train.lst --out rec --label-style pair
      labels [class, 1.0] with flag 2, exactly like face2rec2
  gpu-align pack train.lst --out rec_flat --layout flat --shuffle 42
      keys 0..N-1, no meta records, records shuffled with seed 42: for DALI's fn.readers.mxnet
  gpu-align pack train.lst --out rec --resume
      continue a pack that was interrupted (Ctrl-C, kill, full disk); the result is byte-identical

Paths in the .lst may be absolute, or relative to --root (default: the .lst's folder). Identities get labels
0..C-1 in the order they first appear in the .lst (face2rec2 keeps the .lst's labels; pack says when it changed
them, and report.json maps old to new); each identity's lines must be consecutive.
aligned=1 lines are aligned crops: stored byte for byte after one strict decode. aligned=0 lines are photos:
`gpu-align pack` aligns them like `gpu-align run LST` (with the line's landmarks when it has them, else by
detection); a .lst that mixes both kinds is refused there; `python -m packer pack` (no torch) refuses photos.
Skipped inputs (missing, unreadable or not a regular file, over 64 MiB, not JPEG or PNG, wrong size, truncated,
corrupt, bad landmarks, too few images) are listed with reasons in DIR/report.json. Outputs are written as *.partial
and renamed at the end; DIR/pack.state.json records progress.
"""

_PREFETCH = 64  # files read ahead by the reader threads
# An aligned crop is a few KB (a 1024×1024 PNG stays under 4 MB): a bigger file is not one, and is never read whole.
MAX_CROP_BYTES = 64 << 20


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or H,W (e.g. 112 or 112,112), got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W with positive numbers, got {text!r}")
    return size


def _check_crop(data: bytes, fmt: str) -> str | None:
    """Decode a stored crop once (as ``verify`` does): None if it decodes, else the skip reason.

    A cut-off file is ``truncated``; damaged data, also where libjpeg-turbo recovers and only warns, ``corrupt``.
    """
    try:
        if fmt == "JPEG":
            try:  # grey output: the same entropy decoding (where damage shows), no colour conversion
                simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
            except ValueError:
                decode_image(data)  # e.g. CMYK: judged exactly as `verify` judges it
        else:
            decode_image(data)
    except ValueError as e:
        msg = str(e).removeprefix("corrupt JPEG: ")
        kind = "truncated" if "Premature end of JPEG file" in msg else "corrupt"
        return f"{kind}: {msg}"
    return None


def _load(entry: LstEntry, root: str, size: tuple[int, int]) -> PackItem:
    """Read one .lst entry's file and check it; a problem becomes a skip reason, never an exception."""
    path = os.path.abspath(os.path.join(root, entry.path))  # join keeps an absolute entry.path as it is
    item = PackItem(group=str(entry.label), body=None, lst=entry.with_path(path), source=path)
    if entry.bad_landmarks is not None:  # nan/inf/degenerate landmarks: never packed, whatever the crop
        item.skip_reason = entry.bad_landmarks
        return item
    if entry.aligned == 0:
        item.skip_reason = "needs alignment: aligned=0 line (a photo); `gpu-align run` detects and aligns these"
        return item
    try:
        data = read_regular_file(path, MAX_CROP_BYTES)  # a FIFO or /dev/zero is refused, never read
    except FileNotFoundError:
        item.skip_reason = "missing file"
        return item
    except NotRegularFileError:
        item.skip_reason = "unreadable: not a regular file"
        return item
    except TooBigError as e:
        item.skip_reason = f"too large: {e}"
        return item
    except OSError as e:
        item.skip_reason = f"unreadable: {e.strerror}"
        return item
    if not data:
        item.skip_reason = "not an image: empty file"
        return item
    if image_format(data) not in ("JPEG", "PNG"):
        item.skip_reason = f"not an image: no JPEG or PNG header (starts with {data[:8].hex(' ')})"
        return item
    try:
        info = probe_image(data)  # the decoders' header probe: size, and cut-off files caught before decoding
    except ImageError as e:
        item.skip_reason = str(e)
        return item
    if (info.height, info.width) != size:
        item.skip_reason = (
            f"wrong size: {info.width}x{info.height}, expected {size[1]}x{size[0]} (--image-size); "
            "photos that are not aligned crops need `gpu-align run`"
        )
    elif (bad := _check_crop(data, info.format)) is not None:
        item.skip_reason = bad
    else:
        item.body = data
    return item


def _items(entries: Iterable[LstEntry], root: str, size: tuple[int, int], threads: int) -> Iterator[PackItem]:
    """``_load`` over ``entries`` in order, reading ahead with ``threads`` threads (bounded memory)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: collections.deque = collections.deque()
        it = iter(entries)
        for e in it:
            window.append(pool.submit(_load, e, root, size))
            if len(window) >= _PREFETCH:
                break
        while window:
            yield window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(_load, nxt, root, size))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _renumbering(groups: dict[str, int], report: dict) -> dict[str, int]:
    """``{.lst label: stored label}`` of the identities that were stored (labels 0..C-1 in .lst order).

    ``groups``: lines per .lst label, in .lst order. An identity is stored when some of its lines were not skipped
    (report.json lists every skipped input, "too few images" included, across resumes).
    """
    skipped: dict[str, int] = {}
    for s in report.get("skipped", []):
        skipped[s.get("group")] = skipped.get(s.get("group"), 0) + 1
    kept = [g for g, n in groups.items() if n > skipped.get(g, 0)]
    return {g: i for i, g in enumerate(kept)}


def _note_renumbering(out_dir: str, groups: dict[str, int]) -> str | None:
    """When any stored identity's label differs from its .lst label: record the map in report.json, return a note."""
    path = os.path.join(out_dir, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    mapping = _renumbering(groups, report)
    changed = [(g, i) for g, i in mapping.items() if g != str(i)]
    if not changed:
        return None
    shown = ", ".join(f"{g} → {i}" for g, i in changed[:3]) + (", …" if len(changed) > 3 else "")
    note = (
        f"{len(changed)} of {len(mapping)} identities got a new label ({shown}): labels are renumbered to "
        f"0..{len(mapping) - 1} in .lst order (face2rec2 keeps the .lst's labels); report.json has the map"
    )
    report["label_renumbering"] = {"note": note, "lst_to_stored": mapping}
    atomic_write(path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
    return note


def _print_summary(s: WriteSummary, quiet: bool) -> None:
    resumed = f" (resumed after {s.resumed_from} inputs)" if s.resumed_from else ""
    if s.already_finished:
        resumed = " (already finished: nothing to do)"
    msg = (
        f"{s.out_dir}: {s.num_images} images, {s.num_classes} identities "
        f"({s.layout} layout, {s.label_style} labels){resumed}"
    )
    if s.num_skipped:
        reasons = ", ".join(f"{n} {k}" for k, n in s.skipped_by_reason.items())
        msg += f"; skipped {s.num_skipped} inputs ({reasons}), listed in {s.report_path}"
    print("gpu-align pack: done")
    print(f"  {msg}")


def _run(args: argparse.Namespace) -> int:
    lst_path = args.lst
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    # Pass 1 checks the whole .lst before anything is written; pass 2 streams it (memory stays per identity).
    total = 0
    unaligned: list[str] = []
    n_unaligned = 0
    groups: dict[str, int] = {}  # lines per .lst label, in .lst order (for the renumbering note)
    for e in read_lst(lst_path):
        total += 1
        groups[str(e.label)] = groups.get(str(e.label), 0) + 1
        if e.aligned == 0:
            n_unaligned += 1
            if len(unaligned) < 3:
                unaligned.append(e.path)
        elif split_member_path(e.path) is not None:  # else every such line would be skipped as a missing file
            raise UserError(
                f"{lst_path}: entry {total} names an archive member as an aligned crop (aligned=1: {e.path}); pack "
                "stores aligned crops from files only: extract the archive, or list photos with --aligned 0 for "
                "`gpu-align pack`/`gpu-align run`, which read archive members"
            )
    if not total:
        raise UserError(f"{lst_path}: no entries")
    # `gpu-align` hands over its aligner as args.aligner (it needs torch, which the packer does not import);
    # without one (`python -m packer pack`), a .lst of photos is refused and photo lines among crops are skipped.
    aligner: Callable[[argparse.Namespace], int] | None = getattr(args, "aligner", None)
    if n_unaligned == total and aligner is None:
        raise UserError(
            f"{lst_path}: its {total} lines are photos (aligned=0, e.g. {unaligned[0]}) that need face detection and "
            f"alignment, which `python -m packer pack` (no torch) does not do; run `gpu-align pack {lst_path} --out "
            f"{args.out}` (or `gpu-align run`), which align them"
        )
    if n_unaligned and aligner is not None:
        if n_unaligned < total:
            raise UserError(
                f"{lst_path} mixes {total - n_unaligned} aligned crops (aligned=1) with {n_unaligned} photos that need "
                f"alignment (aligned=0, e.g. {unaligned[0]}); pack each kind into its own dataset (split the .lst "
                "on its first field) and join them with `gpu-align merge`"
            )
        return aligner(args)  # photos: detect (or use the line's landmarks), align, encode, pack
    root = os.path.abspath(args.root if args.root is not None else os.path.dirname(os.path.abspath(lst_path)))
    config = {"command": "pack", "lst_sha256": _sha256(lst_path), "root": root}
    try:
        writer = DatasetWriter(
            args.out,
            layout=args.layout,
            label_style=args.label_style,
            image_size=args.image_size,
            min_images=args.min_images,
            shuffle_seed=args.shuffle,
            resume=args.resume,
            overwrite=args.overwrite,
            config=config,
        )
    except OSError as e:
        raise UserError(f"cannot write to {args.out}: {e.strerror} ({e.filename})") from None
    if n_unaligned:
        first = ", ".join(unaligned) + (", …" if n_unaligned > len(unaligned) else "")
        print(
            f"gpu-align: note: {n_unaligned} lines have aligned=0 (photos that need face detection and "
            f"alignment: {first}); pack skips them, `gpu-align run` aligns them",
            file=sys.stderr,
        )
    from tqdm import tqdm

    todo = itertools.islice(read_lst(lst_path), writer.done, None)
    try:
        with (
            writer,
            tqdm(  # this invocation's work only: the rate and ETA after a resume are this run's
                total=total - writer.done,
                unit="img",
                desc=f"pack (resumed at {writer.done:,} of {total:,})" if writer.done else "pack",
                disable=args.quiet,
                file=sys.stderr,
            ) as bar,
        ):
            for item in _items(todo, root, args.image_size, args.threads):
                writer.add(item)
                bar.update()
            summary = writer.close()
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(
            f"writing {args.out} failed: {e.strerror or e}{where}; everything written so far is kept: "
            "fix the cause (e.g. free disk space) and rerun the same command with --resume"
        ) from None
    except KeyboardInterrupt:
        print(
            f"gpu-align: pack interrupted; rerun the same command with --resume to continue {args.out}", file=sys.stderr
        )
        raise
    _print_summary(summary, args.quiet)
    if not summary.already_finished and (note := _note_renumbering(args.out, groups)):
        print(f"  note: {note}")
    write_report_html_or_warn(args.out)  # after the note: the page shows the final report.json
    if summary.num_images == 0:
        print("gpu-align: warning: no images were written", file=sys.stderr)
        return 1
    return 0


HELP = (
    "pack a face2rec2 .lst into train.rec/.idx/.lst + property: aligned=1 crops stored as they are, "
    "aligned=0 photos aligned (with their landmarks, else detected)"
)
DESCRIPTION = (
    "Pack a face2rec2 .lst into an InsightFace dataset folder: train.rec, train.idx, train.lst, "
    "property, report.json. aligned=1 lines (aligned crops) are stored byte for byte, as face2rec2 does; "
    "aligned=0 lines (photos) are aligned like `gpu-align run LST`: warped with the line's landmarks when it "
    "has them, else detected. Killed or out of disk space? Rerun with --resume."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "pack", HELP, DESCRIPTION, EPILOG)
    p.add_argument("lst", metavar="LST", help="face2rec2 .lst (e.g. from `gpu-align lst`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty or new)")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="insightface",
        help="insightface (default): image keys 1..N, key 0 header, identity records (arcface_torch, mxnet); "
        "flat: keys 0..N-1 only, scalar labels (DALI's fn.readers.mxnet)",
    )
    p.add_argument(
        "--label-style",
        choices=LABEL_STYLES,
        default="scalar",
        help="scalar (default): class in the record header, like InsightFace's released datasets, read by every "
        "known loader; pair: [class, 1.0], face2rec2's bytes, which arcface_torch on torch >= 2 (its upstream "
        "bug), TreB1eN's loader, mx.io.ImageRecordIter and DALI do not read",
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        default=(112, 112),
        metavar="H[,W]",
        help="crop size, written to property as C,H,W; images of another size are skipped (default: 112)",
    )
    p.add_argument(
        "--min-images",
        type=int,
        default=1,
        metavar="N",
        help="drop identities with fewer than N stored images; labels stay contiguous (default: 1)",
    )
    p.add_argument(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="flat layout: shuffle the records with this seed (same seed, same bytes)",
    )
    p.add_argument(
        "--root", default=None, metavar="DIR", help="folder that relative .lst paths start from (default: the .lst's)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted pack into DIR (same LST and options; an empty or missing DIR starts fresh, "
        "a finished one is left as it is)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace gpu-align's files in DIR (other files are left alone)"
    )
    p.add_argument("--threads", type=int, default=4, metavar="N", help="file reader threads (default: 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
