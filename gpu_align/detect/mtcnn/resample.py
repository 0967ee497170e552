"""Batched "area" resampling of many image regions at once, from summed-area tables (integral images).

facenet-pytorch resizes with ``F.interpolate(mode="area")``, i.e. ``adaptive_avg_pool2d``: output pixel ``i`` of
``O`` averages input rows ``[floor(i*I/O), ceil((i+1)*I/O))`` (bins overlap when ``I/O`` is not an integer), and
the same for columns. With a summed-area table every such bin mean is four lookups, whatever the sizes, so

- every pyramid level of every image (different sizes, written into the P-Net atlas), and
- every R-Net/O-Net candidate crop (24×24 / 48×48, any source size, thousands of boxes)

are each produced by ONE vectorised gather, with no loop over images, levels or boxes. The tables are exact
integers (int32; int64 for images over 8 Mpx), and means are computed as ``sum / kh / kw`` like PyTorch's pooling
kernel, so the result equals ``F.interpolate(..., mode="area")`` of the same region bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Beyond this many pixels an int32 table could overflow (255 · H · W ≥ 2^31).
_INT32_MAX_PIXELS = (2**31 - 1) // 255


@dataclass
class IntegralImages:
    """Summed-area tables of a batch of RGB images, concatenated in one flat buffer.

    ``flat[base[b] + y * stride[b] + x]`` is the (3,) sum of image ``b``'s pixels ``[0, y) × [0, x)``,
    for ``0 <= y <= H_b``, ``0 <= x <= W_b``.
    """

    flat: torch.Tensor  # (T, 3) int32 (int64 for huge images) on device
    base: torch.Tensor  # (B,) int64 on device
    stride: torch.Tensor  # (B,) int64 on device, W_b + 1
    heights: list[int]
    widths: list[int]
    bases: list[int]  # host copy of ``base``
    buffer: torch.Tensor  # the 1-D allocation ``flat`` lives in (pass it back as ``workspace`` to reuse it)
    height: torch.Tensor  # (B,) int64 on device, H_b (base, stride, height, width: views of one transfer)
    width: torch.Tensor  # (B,) int64 on device, W_b

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def table(self, b: int) -> torch.Tensor:
        """Image ``b``'s table as an (H+1, W+1, 3) view."""
        h, w = self.heights[b], self.widths[b]
        return self.flat[self.bases[b] : self.bases[b] + (h + 1) * (w + 1)].view(h + 1, w + 1, 3)


# Pixels per step of the batched torch scan (temporaries ~250 bytes per pixel: ~4 GB at 2^24).
SCAN_PIXELS = 1 << 24


def integral_images(
    images: Sequence[torch.Tensor],
    workspace: torch.Tensor | None = None,
    *,
    torch_scan: bool | None = None,
    max_pixels: int = SCAN_PIXELS,
) -> IntegralImages:
    """Summed-area tables of ``images``: each (H, W, 3) uint8 on one device (sizes may differ).

    ``workspace``: optional 1-D int32/int64 buffer on that device to build the tables in when it is big enough
    (reusing one avoids page-faulting tens of MB of fresh memory per call on CPU). The result's ``flat`` is a view
    of it then. ``torch_scan``: build the tables with the batched torch scan (:func:`_scan_batch`, the CUDA path)
    instead of numpy; default: on any non-CPU device. ``max_pixels``: image pixels per step of that scan.
    """
    if not images:
        raise ValueError("integral_images needs at least one image")
    device = images[0].device
    big = any(im.shape[0] * im.shape[1] > _INT32_MAX_PIXELS for im in images)
    dtype = torch.int64 if big else torch.int32
    heights = [int(im.shape[0]) for im in images]
    widths = [int(im.shape[1]) for im in images]
    sizes = [(h + 1) * (w + 1) for h, w in zip(heights, widths, strict=True)]
    bases = np.cumsum([0, *sizes[:-1]]).tolist()
    # One flat buffer; each table is computed straight into its slice (no concatenation copy).
    total = 3 * sum(sizes)
    buffer = workspace
    if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < total:
        buffer = torch.empty(total, dtype=dtype, device=device)
    flat = buffer[:total].view(-1, 3)
    # Per-image numbers in one host→device transfer: base, stride, H, W, first pixel (of all images' pixels).
    pixel_starts = np.cumsum([0, *(h * w for h, w in zip(heights[:-1], widths[:-1], strict=True))]).tolist()
    meta = torch.tensor([bases, [w + 1 for w in widths], heights, widths, pixel_starts], dtype=torch.int64)
    meta = meta.to(device, non_blocking=True)
    if device.type != "cpu" if torch_scan is None else torch_scan:
        _scan_batch(images, heights, widths, bases, meta, flat, max_pixels)
    else:
        for im, start, h, w in zip(images, bases, heights, widths, strict=True):
            table = flat[start : start + (h + 1) * (w + 1)].view(h + 1, w + 1, 3)
            table[0].zero_()
            table[:, 0].zero_()
            # numpy's cumsum walks rows as vectors; torch's CPU cumsum is ~10× slower on these layouts.
            out = table.numpy()[1:, 1:]
            np.cumsum(im.numpy(), axis=1, dtype=out.dtype, out=out)  # rows first: ~30% faster than columns first
            np.cumsum(out, axis=0, out=out)
    return IntegralImages(
        flat=flat,
        base=meta[0],
        stride=meta[1],
        heights=heights,
        widths=widths,
        bases=bases,
        buffer=buffer,
        height=meta[2],
        width=meta[3],
    )


def _scan_batch(images, heights, widths, bases, meta, flat, max_pixels: int) -> None:
    """The summed-area tables of many images in a fixed number of batched ops per step (the CUDA path).

    A cumsum along a non-innermost dimension is a sequential scan on CUDA; here every scan is one 1-D cumsum
    along the innermost dimension of all images' pixels at once, made segmented by subtracting the running sum
    at each segment's start: rows first (segments = image rows, in the pixels' row-major order), then, after a
    scatter of every image to column-major order, columns. Integer arithmetic in int64 (no overflow: 255 · 2^24
    pixels per step), so the result equals the numpy path exactly. Then one scatter writes the tables (and one
    fill their zero first row and column). Images are grouped into steps of at most ``max_pixels`` pixels.

    Args: images (H_b, W_b, 3) uint8 on one device; heights, widths, bases: host ints; meta: (5, B) int64 on
    the device (base, stride, H, W, first pixel); flat: (T, 3) int32/int64 output on the device.
    """
    device = flat.device
    flat.zero_()
    n = len(images)
    b0 = 0
    while b0 < n:
        b1, pixels = b0, 0
        while b1 < n and (b1 == b0 or pixels + heights[b1] * widths[b1] <= max_pixels):
            pixels += heights[b1] * widths[b1]
            b1 += 1
        if pixels:
            pix = torch.cat([im.reshape(-1, 3) for im in images[b0:b1]]).T.to(torch.int64)  # (3, P)
            starts = meta[4, b0:b1] - meta[4, b0]  # first pixel of each image within the step
            p = torch.arange(pixels, device=device)
            b = torch.searchsorted(starts, p, right=True) - 1  # image of each pixel (0-based within the step)
            q = p - starts[b]
            w = meta[3, b0:b1][b]
            h = meta[2, b0:b1][b]
            y = torch.div(q, w, rounding_mode="floor")
            x = q - y * w
            row_sum = _segmented_cumsum(pix, None, p - x)  # (3, P): sums of [x' <= x] on the pixel's row
            tpos = starts[b] + x * h + y  # column-major position of each pixel within its image
            by_column = torch.empty_like(row_sum).index_copy_(1, tpos, row_sum)
            sums = _segmented_cumsum(by_column, tpos, tpos - y)  # (3, P): sums of [y' <= y] × [x' <= x]
            dst = meta[0, b0:b1][b] + (y + 1) * (w + 1) + (x + 1)  # table entry (y + 1, x + 1)
            flat.index_copy_(0, dst, sums.T.to(flat.dtype))
        b0 = b1


def _segmented_cumsum(x: torch.Tensor, at: torch.Tensor | None, start: torch.Tensor) -> torch.Tensor:
    """Inclusive running sums of ``x`` (C, L) within segments, read at positions ``at`` (M,) (None: every
    position, M = L): ``x[:, start[m] : at[m] + 1]`` summed, where ``start`` (M,) is the first position of the
    segment of ``at[m]``. One cumsum along the innermost dimension; (C, M)."""
    total = torch.cumsum(x, dim=1)
    before = torch.nn.functional.pad(total, (1, 0))  # before[:, i] = sum of x[:, :i]
    return (total if at is None else total.index_select(1, at)) - before.index_select(1, start)


def _bins(index: torch.Tensor, size_in: torch.Tensor, size_out: torch.Tensor | int):
    """adaptive_avg_pool bin ``[start, end)`` of output index ``index`` (integer tensors, broadcasting)."""
    start = torch.div(index * size_in, size_out, rounding_mode="floor")
    end = torch.div((index + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    return start, end


def _take(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat[index]`` for an (T, 3) table and any-shape index: (..., 3). (index_select is ~2× faster on CPU.)"""
    return flat.index_select(0, index.reshape(-1)).view(*index.shape, 3)


def _corner_sums(flat: torch.Tensor, r0, r1, c0, c1) -> torch.Tensor:
    """Region sums from flat offsets: ``r*`` = base + row * stride, ``c*`` = column; broadcasting; (..., 3)."""
    return _take(flat, r1 + c1) - _take(flat, r0 + c1) - _take(flat, r1 + c0) + _take(flat, r0 + c0)


def resample_crops(
    ii: IntegralImages,
    image_index: torch.Tensor,
    y0: torch.Tensor,
    x0: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Area-resample N regions (rows ``[y0, y0+h)``, cols ``[x0, x0+w)`` of image ``image_index``) to size×size.

    Args: (N,) int64 tensors on ``ii.device``; regions must lie inside their image and be non-empty.
    Returns: (N, 3, size, size) float32 channel means in 0..255 (what ``F.interpolate(crop, (size, size),
    mode="area")`` gives for the same crop).
    """
    n = image_index.shape[0]
    if n == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.float32, device=ii.device)
    idx = torch.arange(size, device=ii.device)
    rs, re = _bins(idx[None, :], h[:, None], size)  # (N, size)
    cs, ce = _bins(idx[None, :], w[:, None], size)
    base = ii.base[image_index][:, None]
    stride = ii.stride[image_index][:, None]
    r0 = (base + (y0[:, None] + rs) * stride)[:, :, None]  # (N, size, 1)
    r1 = (base + (y0[:, None] + re) * stride)[:, :, None]
    c0 = (x0[:, None] + cs)[:, None, :]  # (N, 1, size)
    c1 = (x0[:, None] + ce)[:, None, :]
    sums = _corner_sums(ii.flat, r0, r1, c0, c1).to(torch.float32)  # (N, size, size, 3)
    kh = (re - rs).to(torch.float32)[:, :, None, None]
    kw = (ce - cs).to(torch.float32)[:, None, :, None]
    return (sums / kh / kw).permute(0, 3, 1, 2)


def resample_levels_into(
    ii: IntegralImages,
    image_index: Sequence[int],
    out_h: Sequence[int],
    out_w: Sequence[int],
    page: Sequence[int],
    y: Sequence[int],
    x: Sequence[int],
    ids: Sequence[int],
    out: torch.Tensor,
    ids_out: torch.Tensor,
) -> None:
    """Area-resample K whole images into rectangles of ``out``, one region at a time (the CPU path).

    Same values as :func:`resample_ragged_into`, computed separably per region: two row selections of the
    table (contiguous copies), two column selections, a subtraction each. On CPU this is ~5× faster than the
    one-gather version (whose per-pixel index arithmetic and random gathers do not stay in cache); on CUDA the
    one-gather version avoids ~10 kernel launches per region.

    Args:
        image_index, out_h, out_w, page, y, x, ids: host ints, one per region: output (r, c) of region k goes to
            ``out[page[k], y[k] + r, x[k] + c]``, and ``ids_out`` there gets ``ids[k]``.
        out: (P, H, W, 3) float, written with ``(mean - 127.5) / 128``.
        ids_out: (P, H, W) integer map.
    """
    device = ii.device
    for b, oh, ow, p, y0, x0, k in zip(image_index, out_h, out_w, page, y, x, ids, strict=True):
        h, w = ii.heights[b], ii.widths[b]
        table = ii.table(b)
        r0, r1 = _bins(torch.arange(oh, device=device), h, oh)
        c0, c1 = _bins(torch.arange(ow, device=device), w, ow)
        rows = table.index_select(0, r1) - table.index_select(0, r0)  # (oh, W+1, 3) column-prefix row-bin sums
        sums = (rows.index_select(1, c1) - rows.index_select(1, c0)).to(torch.float32)  # (oh, ow, 3)
        mean = sums / (r1 - r0).to(torch.float32)[:, None, None] / (c1 - c0).to(torch.float32)[None, :, None]
        out[p, y0 : y0 + oh, x0 : x0 + ow] = (mean - 127.5) * 0.0078125
        ids_out[p, y0 : y0 + oh, x0 : x0 + ow] = k


def resample_ragged_into(
    ii: IntegralImages,
    image_index: torch.Tensor,
    out_h: torch.Tensor,
    out_w: torch.Tensor,
    dst_base: torch.Tensor,
    dst_stride: torch.Tensor,
    total: int,
    out: torch.Tensor,
    ids_out: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    *,
    max_pixels: int = 1 << 22,
) -> None:
    """Area-resample K whole images to their own output sizes and write them into a flat destination.

    Args:
        image_index, out_h, out_w, dst_base, dst_stride: (K,) int64 on ``ii.device``. Output pixel (r, c) of
            region k goes to ``out[dst_base[k] + r * dst_stride[k] + c]``.
        total: sum of ``out_h * out_w`` (a host int, so no device sync is needed to size the work).
        out: (M, 3) float tensor (any float dtype), written in place with the normalised value
            ``(mean - 127.5) / 128`` that MTCNN's networks expect.
        ids_out, ids: optional (M,) integer map and (K,) values: ``ids_out`` at every written pixel gets ``ids[k]``.
        max_pixels: pixels processed per step (bounds the temporaries, ~100 bytes per pixel).
    """
    device = ii.device
    k_count = image_index.shape[0]
    if k_count == 0 or total == 0:
        return
    area = out_h * out_w
    first = torch.cumsum(area, 0) - area  # first flat output pixel of each region
    src_h = ii.height[image_index]
    src_w = ii.width[image_index]
    base = ii.base[image_index]
    stride = ii.stride[image_index]
    # Output pixels are enumerated flat, region by region; searchsorted finds each pixel's region, so steps of
    # max_pixels may split regions anywhere and nothing has to be read back to the host.
    for lo in range(0, total, max_pixels):
        hi = min(total, lo + max_pixels)
        t = torch.arange(lo, hi, device=device)
        k = torch.searchsorted(first, t, right=True) - 1
        q = t - first[k]
        ow = out_w[k]
        r = torch.div(q, ow, rounding_mode="floor")
        c = q - r * ow
        oh = out_h[k]
        rs, re = _bins(r, src_h[k], oh)
        cs, ce = _bins(c, src_w[k], ow)
        b = base[k]
        s = stride[k]
        sums = _corner_sums(ii.flat, b + rs * s, b + re * s, cs, ce).to(torch.float32)
        mean = sums / (re - rs).to(torch.float32)[:, None] / (ce - cs).to(torch.float32)[:, None]
        dst = dst_base[k] + r * dst_stride[k] + c
        out[dst] = ((mean - 127.5) * 0.0078125).to(out.dtype)
        if ids_out is not None and ids is not None:
            ids_out[dst] = ids[k].to(ids_out.dtype)
