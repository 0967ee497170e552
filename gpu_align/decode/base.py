"""What every decoder shares: failure reasons, the header probe, file reading, and the :class:`Decoder` base
(batching by a pixel budget, prefetching, and reading files in threads). The backends are in :mod:`.cpu` and
:mod:`.dali`; :func:`gpu_align.decode.make_decoder` picks one."""

from __future__ import annotations

import io
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import torch

from packer.errors import UserError
from packer.imageinfo import NotRegularFileError, TooBigError, read_regular_file

# Per-photo pixel budget. Detection costs ~50 bytes per decoded pixel on the CPU (a 100 MP photo took 5 GB), so a
# photo above 40 MP (e.g. 8000×6000) is refused from its header ("too large"): downscale such photos first.
DEFAULT_MAX_PIXELS = 40_000_000
# Decoded pixels per batch (384 MB of uint8 RGB): a batch of huge photos is split so memory stays bounded.
DEFAULT_MAX_BATCH_PIXELS = 128_000_000

EMPTY = "empty file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED = "unsupported format"
TRUNCATED = "truncated"
TOO_LARGE = "too large"
CORRUPT = "corrupt"
FAILURE_CATEGORIES = (EMPTY, UNREADABLE, NOT_AN_IMAGE, UNSUPPORTED, TRUNCATED, TOO_LARGE, CORRUPT)

# Formats every backend decodes (DALI's nvImageCodec and Pillow agree on these, EXIF orientation included).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def failure_category(reason: str) -> str:
    """The category of a failure reason (``"truncated: ..." -> "truncated"``)."""
    return reason.split(":", 1)[0]


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


class DecodeError(Exception):
    """A file that cannot be decoded; ``str(e)`` is the failure reason (``"<category>: <detail>"``)."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` learns from a file's header without decoding it."""

    format: str  # one of SUPPORTED_FORMATS
    width: int  # stored size, before EXIF orientation
    height: int
    orientation: int = 1  # EXIF orientation 1..8 (JPEG only; other formats are oriented by Pillow/DALI)
    components: int = 3  # JPEG colour components: 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK (JPEG only)

    @property
    def pixels(self) -> int:
        return self.width * self.height


# --------------------------------------------------------------------------------------------------------------
# Cheap header checks


def _sniff(data: bytes) -> str:
    """Image format from the magic bytes; raises DecodeError for empty, unsupported and non-image data."""
    if not data:
        raise DecodeError(EMPTY, "0 bytes")
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    for magic, name in (
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
        (b"\xff\x4f\xff\x51", "JPEG 2000"),
        (b"8BPS", "PSD"),
        (b"%PDF", "PDF"),
    ):
        if head.startswith(magic):
            raise DecodeError(UNSUPPORTED, name)
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1").strip()
        raise DecodeError(UNSUPPORTED, "AVIF" if brand.startswith("avi") else f"HEIF/ISO media ({brand})")
    if head.startswith(b"\xff\xd8"):
        raise DecodeError(CORRUPT, "JPEG start marker without a following segment")
    raise DecodeError(NOT_AN_IMAGE, f"unrecognised content, starts with {head[:12]!r}")


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})

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


def _exif_orientation(tiff: bytes) -> int:
    """EXIF orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent or invalid."""
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, typ = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == 0x0112 and typ in (3, 4):  # SHORT, or LONG (some writers use it; Pillow honours both)
                fmt = order + ("H" if typ == 3 else "I")
                (value,) = struct.unpack(fmt, tiff[entry + 8 : entry + 8 + struct.calcsize(fmt)])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def _probe_jpeg(data: bytes, max_pixels: int) -> ImageInfo:
    """Walk the JPEG segments up to the first scan: size, EXIF orientation, and the truncation check."""
    n = len(data)
    pos = 2
    width = height = components = 0
    arithmetic = False
    orientation = 0  # 0: no EXIF block seen yet (the first one counts)
    while True:
        if pos >= n:
            raise DecodeError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        if data[pos] != 0xFF:
            raise DecodeError(CORRUPT, f"JPEG marker expected at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise DecodeError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            continue
        if marker == 0xD9:
            raise DecodeError(CORRUPT, "JPEG ends before any image data")
        if pos + 2 > n:
            raise DecodeError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        seglen = (data[pos] << 8) | data[pos + 1]
        if seglen < 2:
            raise DecodeError(CORRUPT, f"JPEG segment length {seglen} at byte {pos}")
        end = pos + seglen
        if end > n:
            raise DecodeError(TRUNCATED, f"JPEG header ends early ({n} bytes)")
        if marker in _SOF_MARKERS and seglen >= 8:
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            components = data[pos + 7]
            arithmetic = marker in _ARITHMETIC_SOF
        elif marker == 0xE1 and orientation == 0 and data[pos + 2 : pos + 8] == b"Exif\x00\x00":
            orientation = _exif_orientation(memoryview(data)[pos + 8 : end])
        elif marker == 0xDA:
            break
        pos = end
    if width == 0 or height == 0:
        raise DecodeError(CORRUPT, "JPEG has no frame header (or a zero size) before its image data")
    # Entropy-coded data cannot contain FF D9 (0xFF is byte-stuffed), so an end-of-image marker after the first
    # scan means the file is complete; trailing bytes after it are allowed, as libjpeg allows them.
    if data.rfind(b"\xff\xd9", end) < 0:
        raise DecodeError(TRUNCATED, f"JPEG has no end-of-image marker after its image data ({n} bytes)")
    # Huffman coding spends at least one bit on every 8×8 block's DC coefficient (full-resolution component):
    # less entropy data than that cannot hold the claimed size (a few hundred bytes claiming 10000×10000 would
    # otherwise be decoded into a 300 MB grey image). Arithmetic coding has no such floor.
    _check_pixels("JPEG", width, height, max_pixels)  # "too large" says more than "truncated"
    min_bytes = ((width + 7) // 8) * ((height + 7) // 8) // 8
    if not arithmetic and n - end < min_bytes:
        raise DecodeError(
            TRUNCATED, f"{n - end} bytes of JPEG data cannot hold {width}x{height} (needs at least {min_bytes})"
        )
    return ImageInfo("JPEG", width, height, orientation or 1, components)


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError(TRUNCATED if len(data) < 33 else CORRUPT, "PNG without a valid IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if data.rfind(b"IEND", 33) < 0:
        raise DecodeError(TRUNCATED, f"PNG has no IEND chunk ({len(data)} bytes)")
    return ImageInfo("PNG", width, height)


def _probe_pillow(data: bytes, fmt: str) -> ImageInfo:
    """WebP/BMP: size from Pillow's lazy open (header only), plus the container's own length field."""
    from PIL import Image, UnidentifiedImageError

    if fmt == "WEBP" and len(data) < struct.unpack("<I", data[4:8])[0] + 8:
        raise DecodeError(TRUNCATED, f"WebP shorter than its RIFF size ({len(data)} bytes)")
    if fmt == "BMP" and len(data) >= 6 and len(data) < struct.unpack("<I", data[2:6])[0]:
        raise DecodeError(TRUNCATED, f"BMP shorter than its header's file size ({len(data)} bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise DecodeError(TOO_LARGE, str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as e:
        raise DecodeError(CORRUPT, f"{fmt} header: {e}") from None
    return ImageInfo(fmt, width, height)


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format, stored size and EXIF orientation from the header bytes, without decoding pixels.

    Raises :class:`DecodeError` for empty, non-image, unsupported, truncated, malformed and over-``max_pixels``
    data (the decompression-bomb check happens here, before any decoder allocates the image).
    """
    fmt = _sniff(data)
    if fmt == "JPEG":
        info = _probe_jpeg(data, max_pixels)
    elif fmt == "PNG":
        info = _probe_png(data)
    else:
        info = _probe_pillow(data, fmt)
    _check_pixels(fmt, info.width, info.height, max_pixels)
    return info


def _check_pixels(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(CORRUPT, f"{fmt} with size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            TOO_LARGE, f"{width}x{height} ({width * height / 1e6:.1f} MP) > max_pixels ({max_pixels / 1e6:.1f} MP)"
        )


def read_file(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes; DecodeError("unreadable: ...") for OS errors and non-regular files (a FIFO, a device,
    a directory: never opened in a way that blocks), "too large" for absurd file sizes."""
    # No supported format stores more than ~4 bytes per pixel (BMP/PNG worst case), so a bigger file is a bomb too.
    max_bytes = 4 * max_pixels + (1 << 20)
    try:
        return read_regular_file(path, max_bytes)
    except NotRegularFileError:
        raise DecodeError(UNREADABLE, "not a regular file") from None
    except TooBigError as e:
        raise DecodeError(TOO_LARGE, str(e)) from None
    except OSError as e:
        raise DecodeError(UNREADABLE, e.strerror or type(e).__name__) from None


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
            return read_file(path, max_pixels=self.max_pixels)
        if isinstance(got, Exception):
            raise got
        return got

    def _read_then_load(self, index: int, path: str) -> Future[Loaded]:
        """Reader thread: read the file, then queue its :meth:`_load` on the loader pool; returns that future."""
        try:
            self._read_ahead[index] = read_file(path, max_pixels=self.max_pixels)
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

    def batches(self, items: Iterable[tuple[int, str | os.PathLike]]) -> Iterator[DecodedBatch]:
        """Decode ``(global index, path)`` items in order; see the class docstring for how batches are formed.

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

    def _groups(self, items: Iterable[tuple[int, str | os.PathLike]]) -> Iterator[tuple[list[Loaded], list]]:
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
                if self.reader_threads > self._loader_threads():
                    pending.append([self._readers.submit(self._read_then_load, int(i), p) for i, p in chunk])
                else:  # no more readers than loaders: the loaders read themselves (no thread hop per file)
                    pending.append([_done(self._pool.submit(self._load, int(i), p)) for i, p in chunk])
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
