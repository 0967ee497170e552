"""CPU decode backend: a thread pool running simplejpeg (libjpeg-turbo) for JPEG and Pillow for the rest.

Both libraries release the GIL while decoding, so threads scale with cores. Pixel results match DALI's CPU
decoder (the same libjpeg-turbo with fancy upsampling; see tests/test_decode.py for the measured tolerance).
16-bit PNGs are decoded by OpenCV (Pillow keeps only the high byte of 16-bit colour) and scaled to 8 bits with
DALI's rounding, ``round(v / 257)``, so every backend gives the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from gpu_align.decode.base import DecodeError, Decoder, Loaded, jpeg_damage
from packer.imageinfo import CORRUPT, TOO_LARGE, ImageInfo, probe_image


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an (H, W, C) array the way ``PIL.ImageOps.exif_transpose`` does.

    Returns a C-contiguous array ((W, H, C) for orientations 5..8); orientation 1 returns ``image`` itself.
    """
    if orientation == 2:
        out = image[:, ::-1]  # mirror left-right
    elif orientation == 3:
        out = image[::-1, ::-1]  # rotate 180
    elif orientation == 4:
        out = image[::-1]  # mirror top-bottom
    elif orientation == 5:
        out = image.transpose(1, 0, 2)  # transpose (mirror across the main diagonal)
    elif orientation == 6:
        out = image[::-1].transpose(1, 0, 2)  # rotate 90° clockwise
    elif orientation == 7:
        out = image[::-1, ::-1].transpose(1, 0, 2)  # transverse (mirror across the anti-diagonal)
    elif orientation == 8:
        out = image[:, ::-1].transpose(1, 0, 2)  # rotate 90° counter-clockwise
    else:
        return image
    return np.ascontiguousarray(out)


def _decode_pillow(data: bytes, fmt: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey: scale as DALI does (Pillow's convert("RGB") would clip instead of scale)
                grey = to_8bit(np.asarray(im, dtype=np.uint32))
                return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
            return np.array(im.convert("RGB"))  # writable (np.asarray of a Pillow image is read-only)
    except Image.DecompressionBombError as e:  # only when max_pixels is set above Pillow's own limit
        raise DecodeError(TOO_LARGE, str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError(CORRUPT, f"{fmt}: {e}") from None


def to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535, any integer dtype) -> uint8 ``round(v / 257)``: DALI's (nvImageCodec's) conversion.

    ``(v + 128) // 257`` is exact: ``v / 257`` is never a half (257 is odd). Truncation (``v >> 8``) would differ
    by one level on about half of the values (e.g. 255 -> 0 instead of 1).
    """
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


# Where Pillow finds a PNG's EXIF orientation (chunk type / text keywords, never compressed).
_PNG_EXIF_MARKERS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def _decode_png16(data: bytes) -> np.ndarray:
    """A 16-bit PNG -> (H, W, 3) uint8 RGB with DALI's ``round(v / 257)``, EXIF orientation applied as Pillow does."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # BGR(A) / grey, uint16, no EXIF
    if arr is None or arr.dtype != np.uint16:
        return _decode_pillow(data, "PNG")  # OpenCV refused it: Pillow decodes it or says why it is corrupt
    if arr.ndim == 2:
        arr = arr[:, :, None]
    rgb = arr[:, :, :1].repeat(3, axis=2) if arr.shape[2] <= 2 else arr[:, :, 2::-1]  # grey(+alpha) / BGR(A)
    image = to_8bit(rgb)
    orientation = 1
    if any(m in data for m in _PNG_EXIF_MARKERS):  # a byte search: Pillow is asked only where it may find one
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            orientation = int(im.getexif().get(0x0112, 1))
    return apply_orientation(np.ascontiguousarray(image), orientation)


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """(H, W, 4) CMYK as stored (Adobe-inverted, as libjpeg returns it) -> (H, W, 3) RGB = C·K/255, truncated.

    The formula DALI's nvImageCodec uses (bit-exact); TurboJPEG's own CMYK->RGB path differs by 1-2 levels.
    """
    rgb = cmyk[..., :3].astype(np.uint16) * cmyk[..., 3:].astype(np.uint16)
    return (rgb // 255).astype(np.uint8)


def decode_bytes(data: bytes, info: ImageInfo | None = None) -> np.ndarray:
    """Decode one image file's bytes on the CPU: ``(H, W, 3) uint8`` RGB numpy array, EXIF orientation applied.

    ``info`` is :func:`gpu_align.decode.probe_image`'s result (probed here when not given, with the default
    ``max_pixels``). Raises :class:`DecodeError` for a file that cannot be decoded.
    """
    if info is None:
        info = probe_image(data)
    if info.format == "PNG" and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        return _decode_png16(data)
    if info.format != "JPEG":
        return _decode_pillow(data, info.format)
    import simplejpeg

    colorspace = "CMYK" if info.components == 4 else "RGB"
    try:
        # Strict: a libjpeg warning raises. Damaged data is "corrupt" (never a half-grey or garbled photo that then
        # reads as "no face"); warnings about metadata only are decoded again without strict.
        try:
            image = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
        except ValueError as e:
            if jpeg_damage(str(e)):
                raise DecodeError(CORRUPT, f"JPEG: {e}") from None
            image = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=False)
    except ValueError as e:
        # e.g. 12-bit or lossless JPEG, which TurboJPEG's API refuses: Pillow applies EXIF orientation itself
        try:
            return _decode_pillow(data, "JPEG")
        except DecodeError:
            raise DecodeError(CORRUPT, f"JPEG: {e}") from None  # libjpeg's message says more than Pillow's
    if info.components == 4:
        image = _cmyk_to_rgb(image)
    return apply_orientation(image, info.orientation)


class CpuDecoder(Decoder):
    """Thread-pool decoder (simplejpeg + Pillow): each worker reads, probes and decodes whole files.

    Images are ``(H, W, 3) uint8`` CPU tensors sharing memory with the decoded numpy arrays, moved to
    ``device`` per batch when that is CUDA.
    """

    name = "cpu-threads"

    def _load(self, index: int, path: str) -> Loaded:
        item = super()._load(index, path)
        if item.reason is None:
            try:
                item.image = torch.from_numpy(decode_bytes(item.data, item.info))
            except DecodeError as e:
                item.reason = str(e)
            item.data = None
        return item

    def _decode(self, items: list[Loaded]):
        if self.device.type == "cpu":
            return [(x.index, x.image) for x in items], []
        return [(x.index, x.image.to(self.device, non_blocking=False)) for x in items], []
