"""``gpu-align demo``: build a small VGGFace2-like folder from shipped face photos and run the whole pipeline on it."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from packer.cli import add_command

DESCRIPTION = """\
The main job on an embedded demo dataset, end to end, with nothing to download:
  1. build OUT/photos: a VGGFace2-like root/<identity>/<image> folder (tens of identities, a few hundred photos
     of varied size, crop, rotation, EXIF orientation, JPEG quality, some grayscale and PNG) from the real face
     photos that installed packages ship (scikit-image, insightface's wheel, Debian's opencv-doc);
  2. gpu-align run OUT/photos --out OUT/dataset (GPU if there is one, else CPU);
  3. draw OUT/montage.png, a grid of aligned faces read back from the .rec, and print where everything is.
With --as-vggface2 the photos are shipped the way VGGFace2 is: OUT/vggface2_train.tar.gz (train/<identity>/<image>,
no folder left on disk) is run directly, its detections are written as OUT/meta/bb_landmark/loose_bb_train.csv and
loose_landmark_train.csv, and a second run with --landmarks-csv (no detection) into OUT/dataset-from-csv must give
the same train.rec/.idx bytes."""


HELP = "build a demo photo folder from shipped face photos and run the full pipeline on it"
EPILOG = """\
example:
  gpu-align demo                 # writes ./demo-output
  gpu-align demo --device cpu --identities 40 --images 15"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", HELP, DESCRIPTION, EPILOG)
    p.add_argument("--out", "-o", default="demo-output", metavar="DIR", help="where to write (default: demo-output)")
    p.add_argument("--identities", type=int, default=24, help="identities in the demo folder (default: 24)")
    p.add_argument("--images", type=int, default=12, help="mean photos per identity (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo folder (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (default: auto)")
    p.add_argument("--decoder", default="auto", choices=("auto", "dali", "cpu"), help="decoder (default: auto)")
    p.add_argument(
        "--as-vggface2",
        action="store_true",
        help="write the photos as a VGGFace2-like tar.gz with loose_bb/loose_landmark CSVs and run from those",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gpu_align.demo.data import build_demo_dataset
    from gpu_align.pipeline import RunOptions, run
    from gpu_align.pipeline.summary import print_summary
    from packer.binfile import max_pairs
    from packer.commands.inspect import dataset_montage
    from packer.montage import save_montage
    from packer.reader import DatasetReader

    out = Path(args.out)
    photos_dir, dataset_dir, montage_path = out / "photos", out / "dataset", out / "montage.png"
    if args.as_vggface2:
        photos_dir = out / "extracted" / "train"  # archived, then removed: the archive is the source
    built = build_demo_dataset(
        photos_dir, identities=args.identities, images_per_identity=args.images, seed=args.seed, overwrite=True
    )
    print(f"gpu-align demo: built {built.describe()}", file=sys.stderr)
    src = str(photos_dir)
    if args.as_vggface2:
        src = str(_as_vggface2(out, photos_dir, args.seed))
    opts = RunOptions(
        src=src, out=str(dataset_dir), device=args.device, decoder=args.decoder, overwrite=True, quiet=args.quiet
    )
    result = run(opts)
    print_summary(result, file=sys.stdout)
    if args.as_vggface2:
        _run_from_csv(out, opts, result)
    with DatasetReader(dataset_dir) as reader:
        save_montage(montage_path, dataset_montage(reader, rows=8, cols=8))
        ranges = reader.identity_ranges() or []
    n_pairs = min(200, max_pairs([b - a for a, b in ranges]))
    me = self_command()
    html = dataset_dir / "report.html"  # written by run() beside report.json
    ds, q = shlex.quote(str(dataset_dir)), shlex.quote
    shown = f"{src}::train/<identity>/<image>" if args.as_vggface2 else f"{photos_dir}/<identity>/<image>"
    print(
        f"\nphotos   {shown}\n"
        f"dataset  {dataset_dir}/train.rec, train.idx, train.lst, property, report.json, report.html\n"
        + (f"report   {dataset_dir / 'report.html'} (open it in a browser)\n" if html.is_file() else "")
        + f"montage  {montage_path}\n\n"
        f"next:\n  {me} inspect {ds}\n  {me} verify {ds}\n  {me} unpack {ds} --out {q(str(out / 'unpacked'))}"
    )
    if n_pairs >= 2:  # a verification set of the demo's own faces
        print(f"  {me} bin --from-dataset {ds} --pairs {n_pairs} --out {q(str(out / 'demo.bin'))}")
    activate = Path(shlex.split(me)[0]).parent / "activate"
    if me != "gpu-align" and activate.is_file():
        print(f"(or run 'source {shlex.quote(str(activate))}' once, then type plain 'gpu-align')")
    return 0


def _as_vggface2(out: Path, photos_dir: Path, seed: int) -> Path:
    """OUT/vggface2_train.tar.gz from the built folder, which is then removed (nothing extracted stays)."""
    from gpu_align.demo.vggface2 import ARCHIVE_NAME, write_vggface2_archive

    archive = out / ARCHIVE_NAME
    write_vggface2_archive(photos_dir, archive, seed=seed)
    shutil.rmtree(photos_dir.parent)
    print(f"gpu-align demo: wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return archive


def _run_from_csv(out: Path, opts, detected) -> None:
    """Write the detection run's boxes and landmarks as VGGFace2's CSVs, run again with --landmarks-csv (no
    detection) and say whether the records came out the same."""
    import dataclasses
    import filecmp

    from gpu_align.csvmeta import write_vggface2_csvs
    from gpu_align.demo.vggface2 import CSV_DIR
    from gpu_align.pipeline import run
    from gpu_align.pipeline.summary import print_summary

    bb, lm = out / CSV_DIR / "loose_bb_train.csv", out / CSV_DIR / "loose_landmark_train.csv"
    rows = write_vggface2_csvs(Path(opts.out) / "train.lst", bb, lm)
    print(f"gpu-align demo: wrote {bb} and {lm} ({rows} rows, from the detections)", file=sys.stderr)
    again = dataclasses.replace(opts, out=str(out / "dataset-from-csv"))
    again.landmarks_csv, again.boxes_csv = str(lm), None
    result = run(again)
    print_summary(result, file=sys.stdout)
    same = all(filecmp.cmp(Path(opts.out) / f, Path(again.out) / f, shallow=False) for f in ("train.rec", "train.idx"))
    rate = (f"{result.images_per_second:.0f} vs {detected.images_per_second:.0f} photos/s with detection"
            if detected.seconds > 0 else "")
    print(
        f"--landmarks-csv run: {'the same' if same else 'DIFFERENT'} train.rec/.idx bytes as the detection run; {rate}"
    )


def self_command(argv0: str | None = None) -> str:
    """How to start gpu-align again so that the command runs as printed, from the current folder.

    ``gpu-align`` when that name on PATH is this very program (an activated venv, a pip install); else the path it
    was started by (``.venv/bin/gpu-align`` from ``scripts/demo.sh``), relative to the current folder when inside it.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == "__main__.py":  # python -m gpu_align
        return f"{shlex.quote(_display(Path(sys.executable)))} -m gpu_align"
    if Path(argv0).name != "gpu-align":  # started some other way (a test runner, an embedding script)
        return "gpu-align"
    me = Path(argv0).absolute()
    found = shutil.which("gpu-align")
    if found and os.path.samefile(found, me):
        return "gpu-align"
    return shlex.quote(_display(me))


def _display(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (``.venv/bin/gpu-align``), else absolute."""
    try:
        rel = str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
    return rel if "/" in rel else f"./{rel}"  # a bare name would be looked up on PATH instead
