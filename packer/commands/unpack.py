"""``gpu-align unpack DIR --out IMGDIR``: write every image of a dataset to ``IMGDIR/<label>/<key>.<ext>``.

Labels and keys are zero-padded to one width per dataset (``07/0042.jpg``), so sorting the names as strings (as
``gpu-align lst`` sorts folders, and as most tools do) keeps the numeric order: unpack -> lst -> pack keeps labels.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from packer.cli import add_command
from packer.errors import UserError
from packer.reader import DatasetReader, image_ext
from packer.verify import check_index_or_refuse

EPILOG = """\
Each image is written with the bytes stored in the .rec (no re-encoding), as IMGDIR/<label>/<key>.jpg;
the extension follows the stored format (.png for PNG bodies, .bin if the bytes are no known image).
Works on both layouts (insightface: keys 1..N from key 0; flat: every record) and both label styles
(scalar, or [class, aligned]: the class is the first value), including InsightFace's released recs.
Labels and keys are zero-padded to the width of the largest (00/007.jpg ... 10/123.jpg), so name order is
numeric order: 'gpu-align lst IMGDIR' then 'gpu-align pack' give every image its old label back (when the
labels are 0..C-1 without gaps) and keep the key order within each identity.

The index is checked first with the rules of 'gpu-align verify' (offsets that point at another identity's
record, two keys on one record, missing keys, an empty .idx beside a full .rec): a problem stops with one error
line. Fix it with 'gpu-align reindex DIR --repair', or pass --force to unpack what the index describes.

A non-empty IMGDIR is refused unless --overwrite (which replaces files of the same name, keeps others).

examples:
  gpu-align unpack data/faces_emore --out /tmp/emore_images
  gpu-align unpack shard.rec --out imgs --overwrite --quiet
"""


def unpack_dataset(
    path, out, *, overwrite: bool = False, progress: bool = True, threads: int = 8, force: bool = False
) -> tuple[int, int]:
    """Write every image of the dataset at ``path`` to ``out/<label>/<key>.<ext>``; returns (images, labels).

    Labels and keys are zero-padded (see the module doc). The index is validated first (UserError unless
    ``force``). Records are read in key order on this thread; ``threads`` threads create the files (file creation,
    not reading, is what takes the time on most file systems).
    """
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    out = Path(out)
    for note in check_index_or_refuse(path, force=force, verb="unpack"):
        print(f"gpu-align: note: {note}", file=sys.stderr)
    with DatasetReader(path) as reader:
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{out} exists and is not a folder")
            if any(out.iterdir()) and not overwrite:
                raise UserError(f"{out} is not empty; choose an empty folder or pass --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        keys = reader.image_keys()
        key_width = len(str(max(keys, default=0)))
        label_width = len(str(max(reader.num_classes - 1, 0)))  # a label beyond it (--force) just gets longer
        made: set[int] = set()
        it = keys
        if progress:
            from tqdm import tqdm

            it = tqdm(keys, desc="unpack", unit="img", mininterval=0.5)
        with ThreadPoolExecutor(threads) as pool:
            pending: deque[Future] = deque()
            for key in it:
                rec = reader.read(key)
                folder = out / f"{rec.label:0{label_width}d}"
                if rec.label not in made:
                    folder.mkdir(exist_ok=True)
                    made.add(rec.label)
                name = f"{key:0{key_width}d}{image_ext(rec.body)}"
                pending.append(pool.submit((folder / name).write_bytes, rec.body))
                if len(pending) > 32 * threads:  # bounded: memory stays small, errors surface early
                    pending.popleft().result()
            for fut in pending:
                fut.result()
    return len(keys), len(made)


def _run(args: argparse.Namespace) -> int:
    n, k = unpack_dataset(
        args.dataset,
        args.out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        threads=args.threads,
        force=args.force,
    )
    print(f"unpacked {n} images of {k} labels to {args.out}")
    return 0


HELP = "write a dataset's images to IMGDIR/<label>/<key>.jpg (stored bytes, no re-encode)"
DESCRIPTION = "Extract the images of a RecordIO dataset into one folder per label."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "unpack", HELP, DESCRIPTION, EPILOG)
    p.add_argument("dataset", metavar="DIR", help="dataset folder (train.rec + train.idx), or a .rec / .idx file")
    p.add_argument("--out", required=True, metavar="IMGDIR", help="output folder (must be empty or new)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty IMGDIR")
    p.add_argument("--threads", type=int, default=8, metavar="N", help="file writer threads (default 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="unpack even if the index fails verify's checks")
    p.set_defaults(func=_run)
