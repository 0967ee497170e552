"""What a run is asked to do and what it did: :class:`RunOptions` (``gpu-align run``'s flags),
:class:`RunResult`, and the checks that refuse bad options before any model loads: the device policy of a run
(:func:`resolve_device`) and the output folders (:func:`check_out_folder`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_align.device import check_device, default_batch_size
from gpu_align.errors import UserError


@dataclass
class RunOptions:
    """Settings of one run (the ``gpu-align run`` options; see ``gpu-align run --help``)."""

    src: str
    out: str
    lst_root: str | None = None  # folder that relative .lst paths start from (default: the .lst's)
    device: str = "auto"
    decoder: str = "auto"
    batch_size: int | None = None  # default: 256 on CUDA, 32 on CPU
    layout: str = "insightface"
    label_style: str = "scalar"
    image_size: int = 112
    quality: int = 95
    min_images: int = 1
    on_miss: str = "skip"
    select: str = "center-largest"
    min_face_rel: float = 0.1
    detector: str = "mtcnn"
    min_score: float | None = None  # confidence floor; None: the detector's default (MTCNN 0.9)
    refine: bool = False  # experimental O-Net landmark refinement; False: the detector's raw landmarks
    landmarks_csv: str | None = None  # VGGFace2 loose_landmark CSV: listed photos are warped with it, not detected
    boxes_csv: str | None = None  # VGGFace2 loose_bb CSV: the detected face that best overlaps the box is kept
    save_crops: str | None = None
    shuffle: int | None = None
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    limit: int | None = None
    threads: int | None = None
    fp16: bool = False
    queue_batches: int = 4
    packer_threads: int | None = None  # JPEG encode threads of the packer process; None: half the cores, at most 8
    report_html: bool = True  # write report.html beside report.json (a Ray run's shards leave it to the merged one)
    quiet: bool = False


@dataclass
class StageTimes:
    """Seconds per stage of the main process (the packer's encode/write come back from its process).

    ``detect``, ``refine``, ``warp``: the device's time (CUDA events on a GPU, so stages that overlap the host's
    work are not double-counted as waiting); ``transfer``: the host's wait for a batch's copy and its message;
    ``queue_wait``: back-pressure from the packer.
    """

    scan: float = 0.0
    decode: float = 0.0
    detect: float = 0.0
    refine: float = 0.0
    warp: float = 0.0
    transfer: float = 0.0
    queue_wait: float = 0.0


@dataclass
class RunResult:
    """What a finished run did; ``report`` is the ``report.json`` that was written."""

    out_dir: Path
    inputs: int
    processed: int  # inputs aligned by this invocation (fewer than ``inputs`` after --resume)
    found: int
    center: int
    missed: int
    failed: int
    seconds: float
    times: StageTimes
    packer: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str) -> torch.device:
    """``--device``: ``auto`` → CUDA when torch sees a GPU, else CPU; an explicit ``cuda`` without a GPU, or
    ``cuda:N`` beyond the devices torch sees, is a one-line :class:`~gpu_align.errors.DeviceError`
    (:func:`gpu_align.device.check_device`)."""
    return check_device(device, "--device", auto=True)


def check_out_folder(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be one (a file, below a file, not writable) before any model loads."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UserError(f"{flag} {path} is a link to nothing (or a link loop); choose a folder")
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose a new or empty folder")
    where = p
    while not where.exists() and where.parent != where:  # the nearest existing folder above: where it is created
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{flag} {path}: {where} is a file, so no folder can be made below it; choose another path")
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".gpu-align-probe-"):  # the real test (root, read-only mounts)
            pass
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot write in {where} ({e.strerror or e}); choose a folder you can write to"
        ) from None


def check_options(opts: RunOptions, device: torch.device) -> None:
    """Fill the device-dependent defaults of ``opts`` (batch size: 256 on CUDA, 32 on CPU) and refuse values
    out of range, and output folders that cannot be written, before any model loads."""
    if opts.batch_size is None:
        opts.batch_size = default_batch_size(device)
    if opts.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {opts.batch_size}")  # the CLI shows its flags
    if opts.packer_threads is not None and opts.packer_threads < 1:
        raise UserError(f"packer_threads must be at least 1, got {opts.packer_threads}")
    if not 1 <= opts.quality <= 100:
        raise UserError(f"quality must be in 1..100, got {opts.quality}")
    check_out_folder(opts.out, "--out")
    if opts.save_crops:
        check_out_folder(opts.save_crops, "--save-crops")
