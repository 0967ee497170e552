"""The device policy of gpu_align, in one place: which device a run uses, what runs where, and how device
failures reach the user. The decoders, detectors, aligner and pipeline ask here instead of testing
``device.type`` or ``torch.cuda`` themselves (:func:`describe` names the device in reports).

- :func:`check_device`: ``"auto"`` (where allowed) picks CUDA when torch sees a GPU; ``cuda`` without a GPU or
  ``cuda:N`` beyond the visible devices is one clear :class:`~gpu_align.errors.DeviceError` line, not a CUDA
  traceback. :func:`require_cuda` refuses CUDA-only options (``fp16``) elsewhere.
- :func:`cuda_paths`: whether the CUDA code paths (and work sizes) run: on a CUDA device, or forced with
  ``tuning="cuda"`` so that CI runs them on CPU. :func:`default_batch_size`: photos per batch by device type.
- :func:`to_device`, :func:`synchronize`: host→CUDA copies are asynchronous (never copies to the host, which could
  be read before they land); waiting for the device only where there is one.
- :class:`HostCopy`, :class:`StageClock`: device→host copies and stage timing that do not wait. On CUDA the copy
  goes into pinned memory behind the queued work and the clock records events, so a batch's warp and copy run
  while the host goes on with the previous batch; the host waits once, when it reads them. On the CPU both are
  the plain synchronous thing.
- :func:`full_fp32`: torch 2.13 runs float32 cuDNN convolutions in TF32 by default (10-bit mantissa), so a GPU's
  detections and landmarks would not equal the CPU's. The aligner turns TF32 (and oneDNN's bf16/tf32 shortcuts)
  off for the duration of its network calls and restores the caller's settings afterwards.
- :func:`is_out_of_memory`, :func:`out_of_memory_stops`: a CUDA (or DALI) out-of-memory error is the batch's
  fault, never a file's: one line with the batch size to rerun with.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from gpu_align.errors import DeviceError

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


@contextmanager
def out_of_memory_stops(what: str, batch: int, device: torch.device) -> Iterator[None]:
    """Turn an out-of-memory error inside into one :class:`~gpu_align.errors.DeviceError` line (:func:`oom_message`).

    Out of memory says nothing about the photos: retrying them one by one or reporting them as misses would
    be wrong, so the run stops (its packer state stays resumable).
    """
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceError(oom_message(what, batch, device)) from e


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


def check_device(device: str | torch.device, what: str = "device", *, auto: bool = False) -> torch.device:
    """``device`` as a ``torch.device`` that exists here: CPU, or a CUDA device torch can see; else DeviceError.

    ``auto``: also accept ``"auto"``, CUDA when torch sees a GPU, else CPU. ``what`` names the setting in the
    message (``"--device"``, ``"device"``).
    """
    if auto and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{what} must be {choices}, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"{what} must be {choices}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{what} {device}: torch sees no CUDA device (this torch build or machine has none); use cpu"
            )
        if dev.index is not None:
            error = cuda_index_error(dev.index, torch.cuda.device_count())
            if error:
                raise DeviceError(f"{what} {error}")
    return dev


def require_cuda(device: torch.device, option: str) -> None:
    """Refuse a CUDA-only ``option`` (e.g. ``"fp16"``) on another device: ``"<option> needs a CUDA device"``."""
    if device.type != "cuda":
        raise DeviceError(f"{option} needs a CUDA device")


TUNINGS = ("cpu", "cuda")


def cuda_paths(device: torch.device, tuning: str | None = None) -> bool:
    """Whether the CUDA code paths run: ``tuning`` (``"cpu"``/``"cuda"``) when given, else ``device``'s type.

    ``tuning="cuda"`` on CPU runs exactly what a GPU would (CI counts its device ops, ``tests/test_device_ops.py``).
    Raises ``ValueError`` for another ``tuning``.
    """
    if tuning is None:
        return device.type == "cuda"
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be 'cpu' or 'cuda', not {tuning!r}")
    return tuning == "cuda"


def default_batch_size(device: torch.device) -> int:
    """Photos per batch when none is asked for: 256 on CUDA (enough work per launch), 32 on CPU."""
    return 256 if device.type == "cuda" else 32


def describe(device: torch.device) -> str:
    """``device`` for reports: ``"cuda:0 (NVIDIA H100 80GB HBM3)"``, ``"cpu"``."""
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronous only towards CUDA (a non-blocking copy to the host could be read
    before it lands)."""
    return tensor.to(device, non_blocking=device.type == "cuda")


def host_to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a list, numpy array or CPU tensor; copied) as a tensor on ``device``, without waiting for the
    device. ``torch.tensor(data, device="cuda")`` is a blocking copy, which waits for every kernel queued before it
    (a hidden host sync); this stages the data and copies it asynchronously. A tensor already on ``device`` is
    returned as it is (``dtype`` applied)."""
    t = data.to(dtype=dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    return to_device(t, torch.device(device))


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stream(device: torch.device) -> torch.cuda.Stream:
    """The current stream of CUDA ``device``, where its queued work and copies run. Not the current device's:
    with ``cuda:1`` an event recorded there (``Event.record()``'s default) would not follow ``cuda:1``'s work."""
    return torch.cuda.current_stream(device)


class HostCopy:
    """Device tensors (all on one device) copied to the host without waiting for them.

    On CUDA each tensor is copied into pinned host memory with ``non_blocking=True`` on its device's current
    stream, behind the work that computes it, and an event on that stream marks the end of the copies;
    :meth:`wait` blocks on that event only. (The caching allocator frees a source tensor for reuse only by later
    work on that stream, so the sources need not outlive the call.) On the CPU the tensors are already on the
    host and :meth:`wait` returns them as they are.
    """

    def __init__(self, *tensors: torch.Tensor):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(_stream(tensors[0].device))
        else:
            self._host = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        """The host tensors (same shapes and dtypes as given), once the copies have landed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


class StageClock:
    """Seconds per named stage, measured only when ``enabled``.

    On CUDA each :meth:`lap` records an event on ``device``'s current stream instead of synchronising (GPU time,
    and the work stays queued); :attr:`seconds` reads the events when first looked into, waiting for the last lap
    if it has not been reached: ask for it after waiting for the batch (e.g. :meth:`HostCopy.wait`) and it costs no
    extra stall. On the CPU a lap reads ``time.perf_counter``.
    """

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self._cuda = enabled and device.type == "cuda"
        self._device = device
        self._laps: list[tuple[str, object, object]] = []
        self._last = self._mark() if enabled else None

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(_stream(self._device))
        return event

    def lap(self, stage: str) -> None:
        """End the current stage, called ``stage`` (a stage lapped twice adds up)."""
        if self.enabled:
            now = self._mark()
            self._laps.append((stage, self._last, now))
            self._last = now

    @property
    def seconds(self) -> Mapping[str, float]:
        """Seconds per stage; on CUDA a mapping that reads the events when first looked into."""
        return _Laps(self._laps, self._cuda)


class _Laps(Mapping[str, float]):
    def __init__(self, laps: list[tuple[str, object, object]], cuda: bool):
        self._laps, self._cuda, self._seconds = laps, cuda, None

    def _resolved(self) -> dict[str, float]:
        if self._seconds is None:
            self._seconds = {}
            if self._cuda and self._laps:  # elapsed_time raises (cudaErrorNotReady) on an event not yet reached
                self._laps[-1][2].synchronize()  # the last lap's end: all the laps' events are on one stream
            for stage, start, end in self._laps:
                dt = start.elapsed_time(end) / 1000 if self._cuda else end - start
                self._seconds[stage] = self._seconds.get(stage, 0.0) + dt
        return self._seconds

    def __getitem__(self, stage: str) -> float:
        return self._resolved()[stage]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


__all__ = [
    "TUNINGS",
    "HostCopy",
    "StageClock",
    "check_device",
    "cuda_index_error",
    "cuda_paths",
    "default_batch_size",
    "describe",
    "fp32_precisions",
    "full_fp32",
    "host_to_device",
    "is_out_of_memory",
    "oom_message",
    "out_of_memory_stops",
    "require_cuda",
    "synchronize",
    "to_device",
]
