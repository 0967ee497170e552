"""The demo dataset as VGGFace2 distributes its data: ``vggface2_train.tar.gz`` (``train/<identity>/<image>.jpg``)
and ``meta/bb_landmark/loose_bb_train.csv`` + ``loose_landmark_train.csv``.

VGGFace2's CSVs were made by a detector (MTCNN, as far as is known); the demo's are written from the detections of
a ``gpu-align run`` on the archive (:func:`gpu_align.csvmeta.write_vggface2_csvs`), so a ``--landmarks-csv`` run
must reproduce that run's records byte for byte, which ``gpu-align demo --as-vggface2`` shows and the tests check.

Inside the archive each identity's photos are contiguous (as ``tar`` writes a directory tree) but in a seeded
shuffled order, like the directory order ``tar`` sees on most file systems, so reading it exercises the reorder
buffer. Same folder and seed, same archive bytes (fixed member mtimes, gzip header without a timestamp).
"""

from __future__ import annotations

import gzip
import os
import random
import tarfile
from pathlib import Path

__all__ = ["CSV_DIR", "write_vggface2_archive"]

CSV_DIR = Path("meta") / "bb_landmark"
ARCHIVE_NAME = "vggface2_train.tar.gz"
_MTIME = 1_500_000_000  # 2017-07-14: fixed, so the archive's bytes depend only on the photos


def write_vggface2_archive(
    folder: str | os.PathLike,
    archive: str | os.PathLike,
    *,
    prefix: str = "train",
    seed: int = 0,
    shuffle: bool = True,
    compress: bool | None = None,
) -> int:
    """Write ``folder``'s ``<identity>/<image>`` files into ``archive`` as ``prefix/<identity>/<image>`` members.

    Identities in sorted order, each contiguous; the photos inside an identity shuffled with ``seed`` (unless
    ``shuffle`` is False). ``compress``: gzip (default: when the name ends in ``.gz``/``.tgz``). Returns the number of
    members written (directories included, as ``tar`` writes them).
    """
    folder = Path(folder)
    archive = Path(archive)
    if compress is None:
        compress = archive.name.lower().endswith((".gz", ".tgz"))
    rng = random.Random(seed)
    archive.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(archive, "wb") as raw:
        gz = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) if compress else None
        try:
            with tarfile.open(fileobj=gz or raw, mode="w", format=tarfile.PAX_FORMAT) as tf:

                def add_dir(name: str) -> None:
                    ti = tarfile.TarInfo(name)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, _MTIME
                    tf.addfile(ti)

                if prefix:
                    add_dir(prefix)
                    n += 1
                for ident in sorted(p for p in folder.iterdir() if p.is_dir()):
                    base = f"{prefix}/{ident.name}" if prefix else ident.name
                    add_dir(base)
                    n += 1
                    files = sorted(p for p in ident.iterdir() if p.is_file())
                    if shuffle:
                        rng.shuffle(files)
                    for f in files:
                        ti = tarfile.TarInfo(f"{base}/{f.name}")
                        ti.size, ti.mode, ti.mtime = f.stat().st_size, 0o644, _MTIME
                        with open(f, "rb") as fh:
                            tf.addfile(ti, fh)
                        n += 1
        finally:
            if gz is not None:
                gz.close()
    return n
