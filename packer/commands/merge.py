"""``gpu-align merge DIR... --out DIR``: merge dataset shards into one dataset (keys and labels renumbered)."""

from __future__ import annotations

import argparse
import sys

from packer.cli import add_command
from packer.layout import LABEL_STYLES, LAYOUTS, WriteSummary
from packer.merge import merge_datasets

EPILOG = """\
The shards' images are copied with their stored bytes (no re-encoding). Keys and labels are renumbered:
labels 0..C-1 in output order, keys 1..N (insightface layout) or 0..N-1 (flat); each identity's images stay
together. Shards may have either layout and either label style (InsightFace's released recs included).

Identities across shards:
  default    every shard's classes are distinct identities: shard 1's classes, then shard 2's, ... Class
             numbers (and even folder names) of independently built shards say nothing about who a person is.
  --by-name  join classes by the identity folder name recorded in each shard's train.lst
             (.../<identity>/<image>.jpg): the same name in several shards becomes one identity. Needs a
             train.lst with one line per image in every shard; identities are then ordered by name.

train.lst is written when every shard has one (paths kept, labels renumbered). Outputs are written as
*.partial and renamed at the end; an interrupted merge continues with --resume.

Each shard's index is checked first with the rules of 'gpu-align verify' (offsets that point at another
identity's record, two keys on one record, keys missing, bytes of the .rec no key covers, an empty train.idx
beside a full train.rec): a problem stops the merge with one error line. Fix it with
'gpu-align reindex SHARD --repair', or pass --force to merge the shard as its index describes it.

examples:
  gpu-align merge shard0 shard1 shard2 --out merged
  gpu-align merge part_a part_b --out merged --by-name --label-style pair
  gpu-align merge shard0 shard1 --out merged_flat --layout flat --shuffle 7
"""


def print_summary(s: WriteSummary, notes: list[str]) -> None:
    for note in notes:
        print(f"gpu-align: note: {note}", file=sys.stderr)
    resumed = f" (resumed after {s.resumed_from} images)" if s.resumed_from else ""
    if s.already_finished:
        resumed = " (already finished: nothing to do)"
    msg = f"{s.out_dir}: {s.num_images} images, {s.num_classes} identities ({s.layout} layout, {s.label_style} labels)"
    if s.num_skipped:
        msg += f"; skipped {s.num_skipped} empty image records, listed in {s.report_path}"
    print(msg + resumed)


def _run(args: argparse.Namespace) -> int:
    summary, notes = merge_datasets(
        args.inputs,
        args.out,
        layout=args.layout,
        label_style=args.label_style,
        by_name=args.by_name,
        shuffle_seed=args.shuffle,
        min_images=args.min_images,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        force=args.force,
    )
    print_summary(summary, notes)
    return 0


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by merge and to-flat."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty or new)")
    p.add_argument(
        "--min-images", type=int, default=1, metavar="N", help="drop identities with fewer than N images (default 1)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run into DIR")
    group.add_argument("--overwrite", action="store_true", help="replace gpu-align's files in DIR")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--force",
        action="store_true",
        help="read inputs whose index fails the checks of 'gpu-align verify' (see below) instead of refusing",
    )


HELP = "merge dataset shards into one (labels/keys renumbered, bytes copied as-is)"
DESCRIPTION = "Merge several RecordIO face datasets into one, in the insightface or flat layout."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "merge", HELP, DESCRIPTION, EPILOG)
    p.add_argument("inputs", nargs="+", metavar="DIR", help="input datasets (folders or .rec files), in order")
    add_common(p)
    p.add_argument("--layout", choices=LAYOUTS, default="insightface", help="output layout (default insightface)")
    p.add_argument(
        "--label-style",
        choices=LABEL_STYLES,
        default="scalar",
        help="scalar (default, like InsightFace's released recs) or pair ([class, 1.0], like face2rec2)",
    )
    p.add_argument("--by-name", action="store_true", help="join identities by their train.lst folder name")
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="flat layout: shuffle with this seed")
    p.set_defaults(func=_run)
