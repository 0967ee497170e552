"""Device facts the aligner and decoders share: full float32 for the networks, CUDA out-of-memory, device checks.

- :func:`full_fp32`: torch 2.13 runs float32 cuDNN convolutions in TF32 by default (10-bit mantissa), so a GPU's
  detections and landmarks would not equal the CPU's. The aligner turns TF32 (and oneDNN's bf16/tf32 shortcuts)
  off for the duration of its network calls and restores the caller's settings afterwards.
- :func:`is_out_of_memory`: a CUDA (or DALI) out-of-memory error is the batch's fault, never a file's.
- :func:`check_device`: ``cuda:N`` beyond the visible devices is one clear error line, not a CUDA traceback.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from packer.errors import UserError

# Per-operator float32 precision settings (torch >= 2.9 API; "ieee" = full float32). oneDNN's are "none" (= ieee)
# by default but can be set to bf16/tf32 by the user.
_PRECISION_KNOBS = ("cudnn.conv", "cudnn.rnn", "cuda.matmul", "mkldnn.conv", "mkldnn.matmul")
# torch also keeps the legacy flags and raises when one is read while it disagrees with the new settings ("a mix of
# the legacy and new APIs"): they are switched with them, so that code reading them inside still works.
_LEGACY_FLAGS = ((torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"))
_lock = threading.Lock()
_depth = 0  # threads currently inside full_fp32()
_saved: dict[str, str] = {}
_saved_legacy: list[tuple[object, str, bool]] = []


def _knob(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if obj is not None and hasattr(obj, "fp32_precision") else None


def fp32_precisions() -> dict[str, str]:
    """The current ``fp32_precision`` of each operator family the networks use (``"tf32"``, ``"ieee"``, ``"none"``)."""
    return {path: k.fp32_precision for path in _PRECISION_KNOBS if (k := _knob(path)) is not None}


def _set_all(precisions: dict[str, str], legacy: list[tuple[object, str, bool]]) -> None:
    for owner, name, value in legacy:  # legacy first: setting one rewrites the new settings under it
        setattr(owner, name, value)
    for path, value in precisions.items():
        _knob(path).fp32_precision = value


@contextmanager
def full_fp32() -> Iterator[None]:
    """Run the enclosed float32 convolutions and matmuls in full float32 (no TF32/bf16), then restore the settings.

    The settings are process-global: while any thread is inside, every thread's float32 cuDNN/cuBLAS/oneDNN work
    runs in full precision. Nested and concurrent uses are counted, so the caller's settings come back only when
    the last one leaves (two aligners in two threads never restore each other's "off" mid-call).
    """
    global _depth
    with _lock:
        if _depth == 0:
            _saved.clear()
            _saved.update(fp32_precisions())
            _saved_legacy.clear()
            for owner, name in _LEGACY_FLAGS:
                # unreadable when the caller already mixed the two APIs: its legacy reads fail anyway
                with contextlib.suppress(RuntimeError):
                    _saved_legacy.append((owner, name, bool(getattr(owner, name))))
            _set_all(dict.fromkeys(_saved, "ieee"), [(o, n, False) for o, n, _ in _saved_legacy])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_all(_saved, _saved_legacy)


# Messages of CUDA / DALI / nvImageCodec allocation failures (DALI reports them as RuntimeError text; its strings
# are in libdali*.so: "CUDA allocation failed", "Can't allocate %zu bytes on device %d.", "cudaErrorMemoryAllocation").
_OOM_MARKERS = (
    "out of memory",
    "cudaerrormemoryallocation",
    "cuda allocation failed",
    "can't allocate",
    "device allocator failed",
    "pinned allocator failed",
    "failed to allocate pinned gpu memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "nvjpeg_status_allocator_failure",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a (CUDA) out-of-memory failure rather than a problem with the data.

    True for ``torch.OutOfMemoryError``, ``MemoryError`` (pybind11's translation of ``std::bad_alloc``, which DALI's
    CUDA allocator throws) and a ``RuntimeError`` whose message is one of the CUDA, cuDNN, cuBLAS, DALI or nvJPEG
    allocation failures (:data:`_OOM_MARKERS`).
    """
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return any(m in text for m in _OOM_MARKERS)


def oom_message(what: str, batch: int, device: torch.device | str) -> str:
    """One line for an out-of-memory stop: where, at which batch size, and the batch size to rerun with."""
    half = max(1, batch // 2)
    return (
        f"CUDA out of memory {what} a batch of {batch} on {device}: rerun with --batch-size {half} "
        f"(FaceAligner: pass at most {half} photos per call)"
    )


def cuda_index_error(index: int, count: int) -> str | None:
    """The error line for ``cuda:index`` when torch sees ``count`` CUDA devices, or None if it exists."""
    if 0 <= index < count:
        return None
    if count == 0:
        return f"cuda:{index} requested but torch sees no CUDA device"
    seen = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
    return (
        f"cuda:{index} requested but torch sees {count} CUDA device{'s' if count > 1 else ''} ({seen}); "
        "CUDA_VISIBLE_DEVICES renumbers them from 0"
    )


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here: CPU, or a CUDA device torch can see; else UserError.

    ``what`` names the setting in the message (``"--device"``, ``"device"``).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{what} must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{what} must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"{what} {device}: torch sees no CUDA device (this torch build or machine has none); use cpu"
            )
        if dev.index is not None:
            error = cuda_index_error(dev.index, torch.cuda.device_count())
            if error:
                raise UserError(f"{what} {error}")
    return dev


__all__ = ["check_device", "cuda_index_error", "fp32_precisions", "full_fp32", "is_out_of_memory", "oom_message"]
