"""``gpu-align to-flat DIR --out DIR``: convert a dataset to the flat layout that DALI's mxnet reader needs."""

from __future__ import annotations

import argparse

from packer.cli import add_command
from packer.commands.merge import add_common, print_summary
from packer.merge import merge_datasets

EPILOG = """\
DALI's fn.readers.mxnet ignores keys and treats every record as a sample, so the classic layout's key 0
header and identity records break it. The flat layout has keys 0..N-1, scalar labels (the class) and no meta
records. Images are copied with their stored bytes; labels are renumbered 0..C-1 in class order (unchanged
for a dataset whose labels are already contiguous). train.lst and property are written as well.

--shuffle SEED permutes the records (numpy RandomState(SEED).permutation): the same seed gives the same
file, byte for byte. Without it the records keep the class order.

The index is checked first with the rules of 'gpu-align verify' (as merge does); a problem stops with one
error line: fix it with 'gpu-align reindex DIR --repair', or pass --force to convert it as it is.

examples:
  gpu-align to-flat data/faces_emore --out data/emore_flat --shuffle 42
  gpu-align to-flat data/ds --out data/ds_flat
"""


def _run(args: argparse.Namespace) -> int:
    summary, notes = merge_datasets(
        [args.dataset],
        args.out,
        layout="flat",
        label_style="scalar",
        shuffle_seed=args.shuffle,
        min_images=args.min_images,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command="to-flat",
        force=args.force,
    )
    print_summary(summary, notes)
    return 0


HELP = "convert a dataset to the flat layout for DALI (keys 0..N-1, scalar labels, no meta records)"
DESCRIPTION = "Rewrite a RecordIO face dataset in the flat layout, optionally shuffled."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "to-flat", HELP, DESCRIPTION, EPILOG)
    p.add_argument("dataset", metavar="DIR", help="dataset folder (train.rec + train.idx), or a .rec file")
    add_common(p)
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the records with this seed")
    p.set_defaults(func=_run)
