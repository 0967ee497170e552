"""``gpu-align bin PAIRS --out name.bin``: build an InsightFace verification set from a pairs list."""

from __future__ import annotations

import argparse
from pathlib import Path

from packer.binfile import load_pair_images, read_pairs, write_bin
from packer.errors import UserError

EPILOG = """\
PAIRS is a text file with one pair per line:
    pathA  pathB  1|0          (1 = same person, 0 = different people)
Fields are separated by whitespace, or by tabs (then paths may contain spaces). Paths are relative to
the pairs file's folder, or absolute. Blank lines and lines starting with # are skipped. The images must
be aligned crops (JPEG or PNG) of one size, e.g. from 'gpu-align run' or 'gpu-align unpack'; their bytes
are stored as they are (no re-encoding).

The .bin is a pickle (protocol 4) of (list_of_image_bytes, list_of_bools) with the images in the order
a0, b0, a1, b1, ..., which InsightFace's and arcface_torch's evaluation code load with
pickle.load(f, encoding='bytes'). It is written atomically; an existing file needs --overwrite.

example pairs.txt:
    aligned/alice/001.jpg  aligned/alice/002.jpg  1
    aligned/alice/001.jpg  aligned/bob/001.jpg    0

examples:
  gpu-align bin pairs.txt --out mytest.bin
  gpu-align inspect mytest.bin --montage /tmp/pairs.png
"""


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")
    pairs = read_pairs(args.pairs)
    images, (h, w) = load_pair_images(pairs, progress=not args.quiet)
    issame = [same for _, _, same in pairs]
    write_bin(out, images, issame)
    pos = sum(issame)
    print(f"wrote {out}: {len(pairs)} pairs ({pos} same, {len(pairs) - pos} different), {h}x{w} images")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bin",
        help="build an InsightFace verification .bin from a pairs list of aligned images",
        description="Pack pairs of aligned face crops into an InsightFace verification set (.bin), "
        "like lfw.bin / cfp_fp.bin / agedb_30.bin.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pairs", metavar="PAIRS", help="pairs list: 'pathA pathB 1|0' per line (see below)")
    p.add_argument("--out", required=True, metavar="NAME.bin", help="the .bin to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .bin")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
