"""Decode stage: image files -> batches of RGB tensors on the compute device, bad files reported and skipped.

Backends (see :func:`make_decoder`):

- ``dali`` on ``cuda``: NVIDIA DALI's ``decoders.image`` on the "mixed" device (nvImageCodec; hardware JPEG decoder
  where the GPU has one). Outputs reach torch through DLPack without a host copy (:mod:`.dali`).
- ``dali`` on ``cpu``: the same pipeline with the "cpu" decoder (runs without a GPU; CI tests it).
- ``cpu``: a thread pool; simplejpeg (libjpeg-turbo) for JPEG, Pillow for PNG/WebP/BMP and as the JPEG fallback
  (:mod:`.cpu`). Images are moved to ``device`` afterwards.

Every backend makes the same decisions, so a dataset built on GPU or CPU has the same images:

- Output: ``(H, W, 3) uint8`` RGB; grayscale is replicated to three channels, CMYK is converted, alpha is dropped.
- EXIF orientation is applied (the photo is shown the way phone galleries show it), for every format.
- Each file's header is parsed cheaply before any decoding (:func:`packer.imageinfo.probe_image`): empty, unreadable,
  non-image, unsupported (GIF, TIFF, HEIC, ...), truncated and over-``max_pixels`` files are rejected up front with
  a reason, so one bad file never reaches (and aborts) a DALI batch. A truncated JPEG (no end-of-image marker
  after its scan data) is rejected as "truncated" rather than decoded to a half-grey image.
- Damaged JPEG data is "corrupt" on every backend, also where libjpeg-turbo recovers and only warns ("Corrupt JPEG
  data: ...", "Premature end of JPEG file"): the CPU backend decodes strictly (:func:`jpeg_damage`), the DALI
  backend checks each JPEG with a reduced-scale strict decode in its loader threads first (DALI itself decodes
  such data silently). A JPEG whose entropy data is too short to hold its claimed size (under one bit per 8×8
  block) is "truncated" from its header. A file a decoder cannot decode at all is "corrupt" too.

A failure reason is ``"<category>: <detail>"`` with the category one of :data:`FAILURE_CATEGORIES`.
"""

from __future__ import annotations

import warnings

import torch

from gpu_align.decode.base import DecodedBatch, DecodeError, Decoder, Loaded, check_jpeg_data, jpeg_damage
from gpu_align.device import check_device
from gpu_align.errors import DecoderError
from packer.imageinfo import (
    CORRUPT,
    DEFAULT_MAX_PIXELS,
    FAILURE_CATEGORIES,
    TOO_LARGE,
    ImageInfo,
    failure_category,
    probe_image,
)

__all__ = [
    "CORRUPT",
    "DEFAULT_MAX_PIXELS",
    "FAILURE_CATEGORIES",
    "TOO_LARGE",
    "DecodeError",
    "DecodedBatch",
    "Decoder",
    "ImageInfo",
    "Loaded",
    "check_jpeg_data",
    "dali_available",
    "failure_category",
    "jpeg_damage",
    "make_decoder",
    "probe_image",
]


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (its CPU pipelines work without a GPU)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


_DALI_ONLY = frozenset({"hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint", "check_jpeg"})


def make_decoder(
    kind: str = "auto",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    **options,
) -> Decoder:
    """Pick and build a decoder.

    ``kind``:
      - ``"auto"``: DALI's mixed (GPU) decoder when ``device`` is CUDA and DALI is installed; otherwise the CPU
        thread pool (simplejpeg + Pillow), which measured faster than DALI's CPU pipeline on 2 cores.
      - ``"dali"``: DALI; the "mixed" decoder for a CUDA ``device``, the "cpu" decoder for ``device="cpu"``.
      - ``"cpu"``: the CPU thread pool; images are moved to ``device`` after decoding.
    ``threads``: decoding threads (default: the usable cores). ``max_pixels``: larger images are rejected
    ("too large") from their header, before decoding. ``options``: ``max_batch_pixels``, ``prefetch``,
    ``reader_threads`` (file-reading threads, default :data:`READER_THREADS`; I/O bound), and for
    DALI ``hw_decoder_load``, ``preallocate_width_hint``, ``preallocate_height_hint``, ``check_jpeg``.
    Raises :class:`~gpu_align.errors.DecoderError` for an unknown kind or ``kind="dali"`` without a working DALI
    (a CUDA device without CUDA: :class:`~gpu_align.errors.DeviceError`); with ``"auto"`` a DALI that fails to
    start (e.g. built for another CUDA) falls back to the CPU decoder with a warning.
    """
    dev = check_device(device, "decode device")  # also cuda:N beyond the visible devices
    auto = kind == "auto"
    if auto:
        kind = "dali" if dev.type == "cuda" and dali_available() else "cpu"
    common = dict(device=dev, threads=threads, batch_size=batch_size, max_pixels=max_pixels)
    if kind == "dali":
        if not dali_available():
            raise DecoderError(
                "decoder 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or use --decoder cpu)"
            )
        from gpu_align.decode.dali import DaliDecoder

        try:
            return DaliDecoder(**common, **options)
        except RuntimeError as e:  # e.g. a DALI wheel built for another CUDA major version than the driver's
            if not auto:
                raise DecoderError(f"DALI could not start on {dev}: {str(e).strip().splitlines()[0]}") from None
            warnings.warn(f"DALI could not start on {dev} ({e}); decoding on the CPU instead", stacklevel=2)
            kind = "cpu"
    if kind == "cpu":
        from gpu_align.decode.cpu import CpuDecoder

        # DALI tuning options are accepted and ignored here, so callers can pass them whatever "auto" picks
        return CpuDecoder(**common, **{k: v for k, v in options.items() if k not in _DALI_ONLY})
    raise DecoderError(f"unknown decoder {kind!r}; choose auto, dali or cpu")
