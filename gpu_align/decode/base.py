"""What every decoder shares: the strict JPEG data check and the :class:`Decoder` base (batching by a pixel
budget, prefetching, reading files in threads; the header probe that rejects bad files first is
:mod:`packer.imageinfo`, shared with ``pack``). The backends are in :mod:`.cpu` and
:mod:`.dali`; :func:`gpu_align.decode.make_decoder` picks one."""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch

from gpu_align.errors import UserError
from packer.imageinfo import (  # the one header probe, shared with `pack`
    CORRUPT,
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    probe_image,
    read_image_file,
)
from packer.imageinfo import ImageError as DecodeError  # a file that cannot be decoded: its reason

# Decoded pixels per batch (384 MB of uint8 RGB): a batch of huge photos is split so memory stays bounded.
DEFAULT_MAX_BATCH_PIXELS = 128_000_000



@dataclass
class DecodedBatch:
    """One batch of decoded images, plus the inputs of this batch that failed.

    ``indices[i]`` is the global input index of ``images[i]``; indices ascend within a batch.
    ``images``: list of ``(H, W, 3) uint8`` RGB tensors on the decoder's device, EXIF orientation applied
    (sizes differ per image). ``failures``: ``(index, path, reason)`` for each input that produced no image.
    """

    indices: list[int]
    images: list[torch.Tensor]
    failures: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------------------------
# JPEG data checks (the header probe is packer.imageinfo's)

# libjpeg-turbo warnings that mean damaged image data (it recovers and fills in grey or garbage); other warnings
# (unknown JFIF revision, Adobe transform code, a bad ICC marker) concern metadata and leave the pixels intact.
_DAMAGE_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Inconsistent progression sequence")


def jpeg_damage(message: str) -> bool:
    """Whether a libjpeg(-turbo) warning/error message reports damaged image data (see :data:`_DAMAGE_WARNINGS`)."""
    return message.startswith(_DAMAGE_WARNINGS) and "bad ICC marker" not in message


def check_jpeg_data(data: bytes, info: ImageInfo) -> None:
    """Raise DecodeError("corrupt: ...") if libjpeg-turbo warns about damaged data in this JPEG.

    A strict decode at 1/8 scale: the entropy decoding (where the damage shows) is complete, the IDCT and colour
    work mostly skipped. Used where the real decoder cannot report warnings (DALI). Other failures (e.g. 12-bit
    JPEGs that TurboJPEG refuses) are left to the decoder.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if info.components == 4 else "GRAY", min_factor=8, strict=True)
    except ValueError as e:
        if jpeg_damage(str(e)):
            raise DecodeError(CORRUPT, f"JPEG: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Decoders


@dataclass
class Loaded:
    """One input after the loading step (read + probe, and for the CPU backend the decode itself)."""

    index: int
    path: str
    data: bytes | None = None
    info: ImageInfo | None = None
    image: torch.Tensor | None = None  # (H, W, 3) uint8 on CPU, when the loader decodes
    reason: str | None = None  # set when the input failed


# Default file-reading threads (I/O bound: enough to keep ~3k files/s in flight at 5 ms per file).
READER_THREADS = 16


class Decoder(ABC):
    """Turns ``(index, path)`` items into :class:`DecodedBatch` es; never raises for a bad file.

    An item may also be ``(index, path, data)``: ``data`` is the input's bytes, or a callable returning them
    (called in a reader thread; it raises :class:`DecodeError` for an input that cannot be read). That is how
    archive members (``archive.tar.gz::train/n1/0001_01.jpg``, never a file on disk) reach the decoder; ``path``
    then only names the input in failures. Plain ``(index, path)`` items are read from disk as before.

    Inputs are taken ``batch_size`` at a time; each such chunk yields one batch (more when its decoded pixels
    exceed ``max_batch_pixels``), so ``len(indices) + len(failures)`` over a chunk's batches equals its size.
    Files of the next ``prefetch`` chunks are read (and, on the CPU backend, decoded) by the thread pool while
    the current chunk is processed. Use as a context manager or call :meth:`close`.
    """

    name: str = "decoder"

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        batch_size: int = 64,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
        prefetch: int = 1,
        reader_threads: int | None = None,
    ):
        if batch_size < 1:
            raise UserError(f"decode batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.threads = max(1, threads or _cpu_count())
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.max_batch_pixels = max_batch_pixels
        self.prefetch = max(0, prefetch)
        # File reading waits on storage (network file systems: ~5 ms per file), so files are read by their own,
        # larger pool (I/O bound) and handed to the loader pool (probe, checks, CPU decode: as many as the cores;
        # oversubscribing it measured ~30 % slower on 2 cores). The hand-over costs ~0.1 ms CPU per file on 2
        # cores (page-cache files: ~20 % fewer files/s in bench_decode); reader_threads <= threads skips it.
        self.reader_threads = max(1, READER_THREADS if reader_threads is None else reader_threads)
        self._readers = ThreadPoolExecutor(self.reader_threads, thread_name_prefix="read")
        if self.reader_threads > self._loader_threads():  # start them all now: a steady thread count from here on
            ready = threading.Barrier(self.reader_threads + 1)
            for _ in range(self.reader_threads):
                self._readers.submit(ready.wait)
            ready.wait()
        self._pool = ThreadPoolExecutor(self._loader_threads(), thread_name_prefix="decode")
        self._read_ahead: dict[int, bytes | Exception] = {}  # index -> bytes read by a reader thread
        self._given: dict[int, bytes | Callable[[], bytes]] = {}  # index -> data of an (index, path, data) item

    def _loader_threads(self) -> int:
        return self.threads

    # -- per-file work (runs in the pool) --
    def _load(self, index: int, path: str) -> Loaded:
        item = Loaded(index, str(path))
        try:
            item.data = self._read(index, path)
            item.info = probe_image(item.data, max_pixels=self.max_pixels)
        except DecodeError as e:
            item.data, item.reason = None, str(e)
        return item

    def _read(self, index: int, path: str) -> bytes:
        """The file's bytes: those a reader thread fetched for ``index`` (see :meth:`_read_then_load`), else read."""
        got = self._read_ahead.pop(index, None)
        if got is None:
            return self._fetch(index, path)
        if isinstance(got, Exception):
            raise got
        return got

    def _fetch(self, index: int, path: str) -> bytes:
        """One input's bytes: its given data (bytes, or a callable returning them), else the file at ``path``."""
        given = self._given.pop(index, None)
        if given is None:
            return read_image_file(path, max_pixels=self.max_pixels)
        return given() if callable(given) else given

    def _read_then_load(self, index: int, path: str) -> Future[Loaded]:
        """Reader thread: read the file, then queue its :meth:`_load` on the loader pool; returns that future."""
        try:
            self._read_ahead[index] = self._fetch(index, path)
        except Exception as e:  # re-raised by _read inside _load, which reports it as for a direct read
            self._read_ahead[index] = e
        return self._pool.submit(self._load, index, path)

    @abstractmethod
    def _decode(self, items: list[Loaded]) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, str, str]]]:
        """Decode probed items: ``([(index, (H, W, 3) uint8 on self.device)], failures)``."""

    # -- batching --
    # Whether the next group's decode is started before the current batch is handed out (see ``_start``).
    overlap = False

    def _start(self, items: list[Loaded]):
        """Start decoding ``items`` in the background; returns a handle for :meth:`_collect`. Default: nothing."""
        return None

    def _collect(self, items: list[Loaded], handle):
        """The result of :meth:`_decode` for ``items`` whose decode :meth:`_start` started. Default: decode now."""
        return self._decode(items)

    def batches(self, items: Iterable[tuple]) -> Iterator[DecodedBatch]:
        """Decode ``(global index, path[, data])`` items in order; see the class docstring for how batches are formed.

        With ``overlap`` (DALI), the decode of batch N+1 is started before batch N is yielded, so the device
        decodes it while the caller detects batch N; the loader pool then reads one more chunk ahead.
        """
        groups = self._groups(items)
        if not self.overlap:
            for group, failures in groups:
                yield self._complete(group, failures, self._decode(group) if group else ([], []))
            return
        cur = next(groups, None)
        handle = self._start(cur[0]) if cur is not None and cur[0] else None
        while cur is not None:
            result = self._collect(cur[0], handle) if cur[0] else ([], [])
            nxt = next(groups, None)
            handle = self._start(nxt[0]) if nxt is not None and nxt[0] else None  # decodes while N is used
            yield self._complete(*cur, result)
            cur = nxt

    def _groups(self, items: Iterable[tuple]) -> Iterator[tuple[list[Loaded], list]]:
        """Loaded items in decode groups (chunks split by pixel budget), each with the failures to report first."""
        it = iter(items)
        pending: deque[list[Future[Future[Loaded]]]] = deque()
        exhausted = False
        ahead = self.prefetch + (1 if self.overlap else 0)
        while True:
            while not exhausted and len(pending) <= ahead:
                chunk = list(islice(it, self.batch_size))
                if not chunk:
                    exhausted = True
                    break
                for x in chunk:  # (index, path, data): the data is read from there, not from path
                    if len(x) > 2:
                        self._given[int(x[0])] = x[2]
                if self.reader_threads > self._loader_threads():
                    pending.append([self._readers.submit(self._read_then_load, int(i), p) for i, p, *_ in chunk])
                else:  # no more readers than loaders: the loaders read themselves (no thread hop per file)
                    pending.append([_done(self._pool.submit(self._load, int(i), p)) for i, p, *_ in chunk])
            if not pending:
                return
            loaded = [f.result().result() for f in pending.popleft()]
            failures = [(x.index, x.path, x.reason) for x in loaded if x.reason is not None]
            good = [x for x in loaded if x.reason is None]
            for group in _split_by_pixels(good, self.max_batch_pixels) or [[]]:
                yield group, failures
                failures = []

    @staticmethod
    def _complete(group: list[Loaded], failures: list, result) -> DecodedBatch:
        decoded, failed = result
        for x in group:  # the encoded bytes are not needed any more
            x.data = None
        decoded.sort(key=lambda t: t[0])
        failures = sorted([*failures, *failed])
        return DecodedBatch([i for i, _ in decoded], [t for _, t in decoded], failures)

    def decode_paths(self, paths: Sequence[str | os.PathLike]) -> DecodedBatch:
        """Convenience: decode a few files into one batch (indices are positions in ``paths``)."""
        out = DecodedBatch([], [], [])
        for b in self.batches(enumerate(paths)):
            out.indices += b.indices
            out.images += b.images
            out.failures += b.failures
        return out

    def close(self) -> None:
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._read_ahead.clear()
        self._given.clear()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name}, device={self.device}, threads={self.threads}, batch={self.batch_size})"
        )


def _done(value):
    """A finished future holding ``value`` (so both loading paths yield futures of futures)."""
    f: Future = Future()
    f.set_result(value)
    return f


def _split_by_pixels(items: list[Loaded], budget: int) -> list[list[Loaded]]:
    """Consecutive groups whose decoded pixels stay within ``budget`` (an oversized image gets its own group)."""
    groups: list[list[Loaded]] = []
    current: list[Loaded] = []
    used = 0
    for x in items:
        px = x.info.pixels if x.info else 0
        if current and used + px > budget:
            groups.append(current)
            current, used = [], 0
        current.append(x)
        used += px
    if current:
        groups.append(current)
    return groups


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
