"""``gpu-align bin``: build an InsightFace verification set from a pairs list, or draw the pairs from a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from packer.binfile import load_pair_images, load_pair_source, pairs_from_source, read_pairs, write_bin
from packer.cli import add_command
from packer.errors import UserError

EPILOG = """\
PAIRS is a text file with one pair per line:
    pathA  pathB  1|0          (1 = same person, 0 = different people)
Fields are separated by whitespace, or by tabs (then paths may contain spaces). Paths are relative to
the pairs file's folder, or absolute. Blank lines and lines starting with # are skipped. The images must
be aligned crops (JPEG or PNG) of one size, e.g. from 'gpu-align run' or 'gpu-align unpack'; their bytes
are stored as they are (no re-encoding).

Or draw the pairs from your own data (--from-dataset): a dataset (DIR with train.rec, e.g. from
'gpu-align run', or an X.rec) or a root/<identity>/<image> folder of aligned crops. --pairs N draws N/2
same-identity and N/2 different-identity pairs, none twice: first an identity (uniformly, so large
identities do not dominate), then images in it. --seed makes it repeatable (same data + seed = same
.bin). The pairs alternate same, different, ... so InsightFace's in-order 10-fold evaluation sees
balanced folds. --identities FILE keeps only the identities it lists (one per line; in a dataset a class
label 0..C-1 or the identity folder name train.lst records; # comments allowed): hold those identities
out of training (e.g. 'gpu-align run' on the other folders) to test on people the model never saw.

The .bin is a pickle (protocol 4) of (list_of_image_bytes, list_of_bools) with the images in the order
a0, b0, a1, b1, ..., which InsightFace's and arcface_torch's evaluation code load with
pickle.load(f, encoding='bytes'). It is written atomically; an existing file needs --overwrite.

example pairs.txt:
    aligned/alice/001.jpg  aligned/alice/002.jpg  1
    aligned/alice/001.jpg  aligned/bob/001.jpg    0

examples:
  gpu-align bin pairs.txt --out mytest.bin
  gpu-align bin --from-dataset heldout-rec --pairs 6000 --out heldout.bin
  gpu-align bin --from-dataset crops/ --pairs 1000 --identities heldout.txt --seed 1 --out mine.bin
  gpu-align inspect mytest.bin --montage /tmp/pairs.png
"""


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")
    if (args.pairs is None) == (args.from_dataset is None):
        raise UserError("give either a PAIRS file or --from-dataset DIR --pairs N (see gpu-align bin --help)")
    if args.from_dataset is None:
        for flag, value in (("--pairs", args.n_pairs), ("--identities", args.identities), ("--seed", args.seed)):
            if value is not None:
                raise UserError(f"{flag} goes with --from-dataset; a PAIRS file lists its pairs itself")
        pairs = read_pairs(args.pairs)
        images, (h, w) = load_pair_images(pairs, progress=not args.quiet)
        issame = [same for _, _, same in pairs]
        where = ""
    else:
        if args.n_pairs is None:
            raise UserError("--from-dataset needs --pairs N: how many pairs to draw (half same, half different)")
        src = load_pair_source(args.from_dataset, args.identities)
        try:
            seed = 0 if args.seed is None else args.seed
            images, issame, (h, w) = pairs_from_source(src, args.n_pairs, seed, progress=not args.quiet)
        finally:
            src.close()
        where = f" drawn from {len(src.names)} identities of {args.from_dataset} (seed {seed})"
    write_bin(out, images, issame)
    pos = sum(issame)
    print(f"wrote {out}: {len(issame)} pairs ({pos} same, {len(issame) - pos} different){where}, {h}x{w} images")
    return 0


HELP = "build an InsightFace verification .bin from a pairs list, or draw pairs from a dataset"
DESCRIPTION = (
    "Pack pairs of aligned face crops into an InsightFace verification set (.bin), "
    "like lfw.bin / cfp_fp.bin / agedb_30.bin: from a pairs list, or drawn (balanced, seeded) from a "
    "dataset or crop folder with --from-dataset."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bin", HELP, DESCRIPTION, EPILOG)
    p.add_argument("pairs", metavar="PAIRS", nargs="?", help="pairs list: 'pathA pathB 1|0' per line (see below)")
    p.add_argument(
        "--from-dataset",
        metavar="DIR",
        help="draw the pairs from a dataset (DIR with train.rec, or X.rec) or a root/<identity>/<image> crop folder",
    )
    p.add_argument("--pairs", dest="n_pairs", type=int, metavar="N", help="with --from-dataset: pairs to draw (even)")
    p.add_argument(
        "--identities", metavar="FILE", help="with --from-dataset: only these identities (one name or label a line)"
    )
    p.add_argument("--seed", type=int, metavar="S", help="with --from-dataset: random seed (default 0)")
    p.add_argument("--out", required=True, metavar="NAME.bin", help="the .bin to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .bin")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
