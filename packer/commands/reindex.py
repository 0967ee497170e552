"""``gpu-align reindex REC``: rebuild a lost or corrupt ``.idx`` by scanning the ``.rec`` (``--repair`` fixes a
damaged ``.rec`` first)."""

from __future__ import annotations

import argparse

from packer.cli import add_command
from packer.reindex import KEY_MODES, reindex

EPILOG = """\
How keys are chosen (--keys):
  header      each record's header id. face2rec2, InsightFace's tools and gpu-align write id = key, so
              this gives back their index byte for byte.
  layout      from the insightface layout: the empty meta record [N+1, N+1+K] is key 0, images are keys
              1..N in file order, identity records N+1..N+K (sorted by their range start).
  sequential  0, 1, 2, ... in file order (a flat layout).
  auto        (default) header if the ids are unique, else layout if the records form one, else sequential.

--repair: a damaged tail (the machine died mid-write) is cut off at the last whole record; the cut bytes
are saved as REC.dropped-<offset>. Damage inside the file: the whole records are copied into a new .rec,
the original is kept as REC.bak. The report says which byte ranges (and which record headers) were
dropped. Records whose bytes differ from train.rec.crc count as damaged too. An insightface layout is
then rebuilt from the surviving image records: keys 1..N, labels 0..K-1 (a class left with no image is
gone, the ones after it move down), key 0 and the identity records recomputed, property updated; lost
keys and classes are listed. Without --repair a damaged .rec is an error and nothing is written.

The .idx is written in the clean form mxnet reads (key<TAB>offset, no blank lines), and train.rec.crc
(one CRC-32 per record) beside the .rec, unless one is there that the records disagree with: it is kept.

The index is written atomically; a previous, different index is kept as IDX.bak.

examples:
  gpu-align reindex data/ds/train.rec
  gpu-align reindex data/ds --repair
  gpu-align reindex flat.rec --keys sequential --idx /tmp/flat.idx
"""


def _run(args: argparse.Namespace) -> int:
    res = reindex(args.rec, idx=args.idx, keys=args.keys, repair=args.repair, progress=not args.quiet)
    for note in res.notes:
        print(note)
    print(f"wrote {res.idx}: {res.records} records; keys: {res.keys} ({res.why})")
    return 0


HELP = "rebuild a lost/corrupt .idx from the .rec (--repair: fix a damaged .rec)"
DESCRIPTION = (
    "Scan a .rec and write its .idx (key<TAB>offset per record, in file order), "
    "as mxnet's MXIndexedRecordIO writes it."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "reindex", HELP, DESCRIPTION, EPILOG)
    p.add_argument("rec", metavar="REC", help="the .rec file (or a dataset folder: its train.rec)")
    p.add_argument("--keys", choices=KEY_MODES, default="auto", help="how keys are chosen (default auto; see below)")
    p.add_argument("--repair", action="store_true", help="remove damaged bytes from the .rec first (see below)")
    p.add_argument("--idx", default=None, metavar="IDX", help="write the index here (default: REC's sibling .idx)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
