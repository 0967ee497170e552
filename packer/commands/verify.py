"""``gpu-align verify DIR``: full integrity scan of a dataset; exit 0 when clean, 1 with a precise report."""

from __future__ import annotations

import argparse
import json

from packer.cli import add_command
from packer.verify import PROBLEM_KINDS, VerifyReport, verify_dataset

EPILOG = """\
What is checked:
  .rec     every byte belongs to a whole record (a truncated last record and damaged spans are found, and
           the scan resumes after them); every record parses
  .idx     lines mxnet's reader accepts (no blank lines, key<TAB>offset: tab, not spaces; reported with
           their line numbers), unique keys, every offset starts a record, every record is indexed
  layout   insightface: key 0 is [N+1, N+1+K]; keys 0..N+K all present; identity records N+1..N+K hold
           [start, end) ranges that are contiguous, non-overlapping and cover 1..N; each image's label is the
           class of the range its key lies in.  flat: keys 0..N-1 (a warning otherwise)
  labels   one style (all scalar or all lists), non-negative integers below num_classes
  property num_classes matches, every image has the property's size
  images   every image decodes (strict: a truncated/corrupt JPEG fails); --no-decode reads headers only
  crc      with a train.rec.crc sidecar (gpu-align's writers make one): every record's CRC-32, so any changed
           byte is found, also in the padding or a JPEG that still decodes

Exit code 0: clean (warnings are printed but do not fail).  1: problems found: the first --max-problems of
them with key and byte offset, then a count per kind.  2: the files are missing or not RecordIO.

examples:
  gpu-align verify data/faces_emore
  gpu-align verify data/shard3/train.rec --no-decode
  gpu-align verify data/ds --json > verify.json
"""


def _run(args: argparse.Namespace) -> int:
    rep = verify_dataset(
        args.dataset,
        decode=not args.no_decode,
        max_problems=args.max_problems,
        workers=args.workers,
        progress=not args.quiet and not args.json,
    )
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(format_report(rep))
    return 0 if rep.ok else 1


def format_report(rep: VerifyReport) -> str:
    """The human-readable report: one status line, a summary, the problems, the counts, the warnings."""
    status = "OK" if rep.ok else f"FAILED: {rep.total} problem{'s' if rep.total != 1 else ''}"
    sizes = ", ".join(f"{s} ({n})" for s, n in rep.image_sizes.items()) or "-"
    lines = [
        f"verify {rep.rec}: {status}",
        f"  layout {rep.layout}, label style {rep.label_style}, {rep.num_records} records ({rep.rec_bytes} bytes), "
        f"{rep.num_images} images, {rep.num_classes} identities",
        f"  image sizes {sizes}" + ("" if rep.decoded else " (headers only, --no-decode)"),
    ]
    if rep.problems:
        shown = len(rep.problems)
        more = f" (first {shown} shown)" if shown < rep.total else ""
        lines.append(f"problems{more}:")
        width = max(len(p.kind) for p in rep.problems)
        lines += [f"  {p.kind:<{width}}  {p.message}" for p in rep.problems]
        lines.append("counts:")
        lines += [f"  {n:>8}  {kind}: {PROBLEM_KINDS[kind]}" for kind, n in rep.counts.most_common()]
    lines += [f"warning: {w}" for w in rep.warnings]
    return "\n".join(lines)


HELP = "check a dataset's integrity (records, index, layout, labels, images)"
DESCRIPTION = (
    "Scan a RecordIO dataset completely and report every problem precisely "
    "(key and byte offset). Exit code 0 when clean, 1 when problems were found."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "verify", HELP, DESCRIPTION, EPILOG)
    p.add_argument("dataset", metavar="DIR", help="dataset folder (train.rec + train.idx), or a .rec / .idx file")
    p.add_argument("--no-decode", action="store_true", help="only read image headers (size/format), do not decode")
    p.add_argument("--max-problems", type=int, default=20, metavar="N", help="problems shown in detail (default 20)")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decode threads (default: one per CPU, up to 8)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
