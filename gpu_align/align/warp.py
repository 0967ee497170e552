"""ArcFace alignment: the 5-point template, a batched similarity fit and a batched bilinear warp, in torch.

Conventions (the same as OpenCV and InsightFace):

- Points are ``(x, y)`` pixel coordinates with pixel centres at integers. Landmark order: eyeL, eyeR, nose,
  mouthL, mouthR (left/right as seen in the image).
- A transform ``M`` is a ``(2, 3)`` affine matrix that maps *source image* pixels to *crop* pixels
  (``dst = M[:, :2] @ src + M[:, 2]``), i.e. the matrix ``cv2.warpAffine(img, M, (S, S))`` takes.
- :func:`warp_faces` reproduces ``cv2.warpAffine(img, M, (S, S), borderValue=0)`` (bilinear, black outside the
  image) in the arithmetic of OpenCV >= 4.11 (float32 coordinates, float32 lerps, round half to even), so the crops
  are bit-identical to OpenCV's on almost every pixel; older OpenCV versions quantise coordinates to 1/32 pixel
  and differ by ±1-2 grey levels.

Everything runs on the device of its inputs (CPU or CUDA). On CUDA there are no per-face Python loops; the CPU
path copies one crop per face (see :func:`warp_faces`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpu_align.device import cuda_paths

# ArcFace (InsightFace) 112×112 template, (x, y): eyeL, eyeR, nose, mouthL, mouthR.
ARCFACE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

_PAD = 2  # zero border around every CPU crop: any sample outside the image then reads only zeros (see warp_faces)


def arcface_template(size: int = 112, *, base: int | None = None, device: torch.device | str | None = None):
    """The ArcFace 5-point template for a ``size`` × ``size`` crop: ``(5, 2)`` float32 ``(x, y)``.

    ``size`` = 112·k: the 112 template scaled by k (112, 224, ...). ``size`` = 128·k: scaled by k with 8·k added
    to x (128, 256, ...: the same face with a wider margin, InsightFace's convention). ``base`` (112 or 128)
    forces one of the two families, with a possibly fractional k (e.g. ``size=96, base=112``); by default 112 is
    tried first, then 128.
    """
    if base is None:
        if size > 0 and size % 112 == 0:
            base = 112
        elif size > 0 and size % 128 == 0:
            base = 128
        else:
            raise ValueError(f"ArcFace crop size must be a multiple of 112 or 128 (or pass base=112|128), got {size}")
    if base not in (112, 128) or size <= 0:
        raise ValueError(f"base must be 112 or 128 and size positive, got base={base}, size={size}")
    k = size / base
    t = torch.tensor(ARCFACE_112, dtype=torch.float64) * k
    if base == 128:
        t[:, 0] += 8.0 * k
    return t.to(device=device, dtype=torch.float32)


def estimate_similarity(src, dst) -> torch.Tensor:
    """Least-squares similarity (Umeyama: scale, rotation, translation, no reflection) mapping ``src`` to ``dst``.

    Args:
        src: ``(B, N, 2)`` or ``(N, 2)`` points (tensor or array-like), e.g. detected landmarks in image pixels.
        dst: ``(N, 2)`` (shared, e.g. :func:`arcface_template`) or ``(B, N, 2)`` points.

    Returns:
        ``(B, 2, 3)`` affine matrices on ``src``'s device, float32 (float64 if an input is float64), such that
        ``M[:, :, :2] @ p + M[:, :, 2]`` ≈ the matching ``dst`` point: the same result as scikit-image's
        ``SimilarityTransform.from_estimate(src, dst)``. Where ``src`` is degenerate (all points equal) the
        row is NaN (:func:`warp_faces` turns such a row into a black crop).

    In 2-D the Umeyama solution has a closed form, computed here without an SVD: with centred points and the
    cross-covariance ``A = Σ d sᵀ``, the optimal ``[[a, -b], [b, a]]`` is ``a = (A00 + A11) / Σ|s|²``,
    ``b = (A10 - A01) / Σ|s|²``. This equals Umeyama's ``c·R`` including its reflection case (``det A < 0`` gives
    scale ``(σ1 - σ2)/var``, which is ``sqrt(a² + b²)`` here).
    """
    src_t = torch.as_tensor(src)
    dst_t = torch.as_tensor(dst, device=src_t.device)
    out_dtype = torch.float64 if torch.float64 in (src_t.dtype, dst_t.dtype) else torch.float32
    squeeze = src_t.dim() == 2
    if squeeze:
        src_t = src_t.unsqueeze(0)
    if src_t.dim() != 3 or src_t.shape[-1] != 2 or dst_t.shape[-2:] != src_t.shape[-2:]:
        raise ValueError(
            f"expected src (B, N, 2) and dst (N, 2) or (B, N, 2), got {tuple(src_t.shape)}, {tuple(dst_t.shape)}"
        )
    # float64 on a (B, N, 2) tensor is cheap on any device and keeps pixel-scale coordinates exact enough
    s = src_t.to(torch.float64)
    d = dst_t.to(torch.float64).expand_as(s)
    s_mean, d_mean = s.mean(dim=1, keepdim=True), d.mean(dim=1, keepdim=True)
    sc, dc = s - s_mean, d - d_mean
    var = (sc * sc).sum(dim=(1, 2))  # (B,)
    a = (sc[..., 0] * dc[..., 0] + sc[..., 1] * dc[..., 1]).sum(dim=1) / var
    b = (sc[..., 0] * dc[..., 1] - sc[..., 1] * dc[..., 0]).sum(dim=1) / var
    degenerate = var <= 1e-12 * (1.0 + s_mean.abs().amax(dim=(1, 2)) ** 2)
    a = torch.where(degenerate, torch.nan, a)
    b = torch.where(degenerate, torch.nan, b)
    R = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)  # (B, 2, 2)
    t = d_mean[:, 0] - (R @ s_mean[:, 0, :, None])[..., 0]  # (B, 2)
    return torch.cat([R, t[..., None]], dim=2).to(out_dtype)


def invert_affine(M: torch.Tensor) -> torch.Tensor:
    """Batched closed-form inverse of ``(..., 2, 3)`` affine matrices (no ``torch.inverse``): same shape/dtype/device.

    Singular matrices give non-finite rows (division by a zero determinant).
    """
    a, b, c = M[..., 0, 0], M[..., 0, 1], M[..., 0, 2]
    d, e, f = M[..., 1, 0], M[..., 1, 1], M[..., 1, 2]
    inv_det = 1.0 / (a * e - b * d)
    ia, ib, id_, ie = e * inv_det, -b * inv_det, -d * inv_det, a * inv_det
    row0 = torch.stack([ia, ib, -(ia * c + ib * f)], dim=-1)
    row1 = torch.stack([id_, ie, -(id_ * c + ie * f)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def transform_points(M: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply ``(B, 2, 3)`` affines to ``(B, N, 2)`` points -> ``(B, N, 2)`` (dtype promoted, M's device)."""
    pts = torch.as_tensor(pts, device=M.device)
    dtype = torch.promote_types(M.dtype, pts.dtype)
    M, pts = M.to(dtype), pts.to(dtype)
    return pts @ M[..., :2].transpose(-1, -2) + M[..., None, :, 2]


def _center_crop_inverse(heights, widths, size: int, margin: float | None) -> torch.Tensor:
    """``(F, 2, 3)`` float64 crop->src affines of :func:`center_crop_affine` (the ``cv2.resize`` sampling map)."""
    h = torch.as_tensor(heights, dtype=torch.float64)
    w = torch.as_tensor(widths, dtype=torch.float64)
    half = (44.0 * size / 112.0 if margin is None else float(margin)) / 2.0
    # int() truncation and int32 boxes, as in face_preprocess
    x1 = torch.clamp(torch.floor(torch.floor(w * 0.0625) - half), min=0)
    y1 = torch.clamp(torch.floor(torch.floor(h * 0.0625) - half), min=0)
    x2 = torch.minimum(torch.floor(w - torch.floor(w * 0.0625) + half), w)
    y2 = torch.minimum(torch.floor(h - torch.floor(h * 0.0625) + half), h)
    sx, sy = (x2 - x1) / size, (y2 - y1) / size  # source pixels per crop pixel
    # crop->src: x = sx·u + (0.5·sx - 0.5 + x1)
    zeros = torch.zeros_like(sx)
    return torch.stack(
        [torch.stack([sx, zeros, 0.5 * sx - 0.5 + x1], -1), torch.stack([zeros, sy, 0.5 * sy - 0.5 + y1], -1)], -2
    )


def center_crop_affine(heights, widths, size: int = 112, margin: float | None = None) -> torch.Tensor:
    """``(F, 2, 3)`` float32 src->crop affines reproducing InsightFace's no-face fallback (``face_preprocess``).

    That fallback took the box inset by 6.25 % of the width/height on each side, grew it by ``margin/2``
    pixels per side (``margin`` = 44 for 112 crops; here 44·size/112 by default), clipped it to the image and
    ``cv2.resize``-d it to ``size`` × ``size`` (aspect ratio not kept). ``cv2.resize``'s bilinear sampling
    (``src = (dst + 0.5)·scale - 0.5``) is an affine map, so :func:`warp_faces` does the same crop.
    ``heights``/``widths``: ``(F,)`` ints (sequence or tensor). On a non-square photo x and y scale differently:
    not a similarity, so no landmark fit reproduces it (see :func:`center_crop_landmarks`).
    """
    return invert_affine(_center_crop_inverse(heights, widths, size, margin)).to(torch.float32)


def center_crop_landmarks(heights, widths, size: int = 112) -> torch.Tensor:
    """``(F, 5, 2)`` float32 (CPU): the :func:`arcface_template` mapped back through :func:`center_crop_affine`.

    What a ``train.lst`` line records for a centre-crop fallback (with the whole photo as its box), and how a
    ``.lst`` face is recognised as one: :class:`~gpu_align.align.FaceAligner` warps a given face whose landmarks
    are these (within :data:`gpu_align.align.aligner.CENTER_MATCH_PX`) with the centre-crop affine, not with a
    similarity fit, which cannot reproduce the crop of a non-square photo (x and y scale differently).
    Computed in float64 from the photo's size alone, on the host, so every caller gets the same numbers.
    """
    inv = _center_crop_inverse(heights, widths, size, None)
    template = arcface_template(size).to(torch.float64).expand(inv.shape[0], 5, 2)
    return transform_points(inv, template).to(torch.float32)


def _as_image_list(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a tensor of images must be (B, H, W, C), got {tuple(images.shape)}")
        return list(images.unbind(0))
    return [torch.as_tensor(im) for im in images]  # numpy arrays are wrapped without a copy


def warp_faces(
    images: Sequence[torch.Tensor] | torch.Tensor,
    image_index,
    M,
    size: int = 112,
    *,
    max_samples_per_chunk: int | None = None,
    tuning: str | None = None,
) -> torch.Tensor:
    """Warp ``F`` faces from a batch of images of different sizes to ``(F, size, size, C)`` uint8, in one call.

    Args:
        images: list of ``(H_i, W_i, C)`` uint8 tensors (HWC, e.g. RGB; numpy arrays are wrapped), all on one
            device, any sizes, ``C`` from 1 to 4; or one ``(B, H, W, C)`` uint8 tensor.
        image_index: ``(F,)`` integer tensor/sequence: which image each face comes from (any order, repeats ok).
        M: ``(F, 2, 3)`` src->crop affines (float, e.g. from :func:`estimate_similarity`), any device; rows with
            NaN/inf or a singular matrix give black crops.
        size: output side ``S``.
        max_samples_per_chunk: bound on output pixels processed at once (memory); default 2**18 on CPU (fits
            the caches better) and 2**24 on CUDA.
        tuning: ``"cuda"`` / ``"cpu"`` take that path (and its default chunk) on any device, as
            ``MTCNN(tuning=...)`` does for the detector (:func:`gpu_align.device.cuda_paths`); None: the device's.
            CI runs the CUDA path on CPU. Both paths give identical crops.

    Returns:
        ``(F, S, S, C)`` uint8 on the images' device, equal to ``cv2.warpAffine(img, M[f], (S, S),
        borderValue=0)`` per face (bilinear, pixel centres at integers, black outside; bit-exact with OpenCV 5
        up to float rounding ties).

    How: per face, the source region that the ``S × S`` output samples from is bounded (the output grid is
    mapped back with the inverse affine, computed in closed form) and clipped to the image, and the region's
    origin is subtracted from the inverse affine's translation (exact), so every sample's coordinates and weights
    are computed relative to it. Bilinear sampling is then a vectorised gather of the four neighbours of every
    output pixel of every face; a neighbour outside the region (hence outside the image) reads black, OpenCV's
    ``BORDER_CONSTANT`` (a partly outside neighbourhood blends with black). Where the pixels come from:

    - CUDA path: all images of the batch concatenated into one buffer of 4-byte pixels; a mask zeroes the outside
      neighbours. A fixed number of ops per call, no host sync, one host→device transfer (sizes and indices).
    - CPU path: each face's region copied, with a 2-pixel zero border, into one buffer of crops (one slice and
      copy per face after one bounds transfer); the border supplies the outside neighbours. On CPU this is ~2×
      faster than padding whole images to 4 bytes per pixel.

    Why a flat buffer and not ``grid_sample`` on a padded batch of crops: crops of one batch differ wildly in
    size (a 30 px face next to an 800 px one), so a padded ``(F, C, Hmax, Wmax)`` float batch wastes memory and
    time quadratically in the largest face, while the flat buffer holds only pixels (the images' or the
    regions'), in uint8, and the gather touches only 4·S² pixels per face. It also reproduces OpenCV's float
    arithmetic exactly, which ``grid_sample`` (whose coordinates go through the [-1, 1] normalisation) does not.
    """
    imgs = _as_image_list(images)
    if not imgs:
        raise ValueError("warp_faces needs at least one image")
    device = imgs[0].device
    C = imgs[0].shape[-1] if imgs[0].dim() == 3 else -1
    for i, im in enumerate(imgs):
        if im.dim() != 3 or im.dtype != torch.uint8 or im.shape[-1] != C or im.device != device:
            raise ValueError(
                f"image {i}: expected (H, W, {C}) uint8 on {device}, got {tuple(im.shape)} {im.dtype} on {im.device}"
            )
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise ValueError(f"image {i} is empty: {tuple(im.shape)}")
    if not 1 <= C <= 4:
        raise ValueError(f"images must have 1 to 4 channels, got {C}")
    S = int(size)
    M = torch.as_tensor(M, device=device)
    if M.dim() != 3 or M.shape[1:] != (2, 3):
        raise ValueError(f"M must be (F, 2, 3), got {tuple(M.shape)}")
    F = M.shape[0]
    if isinstance(image_index, torch.Tensor):
        idx_img = image_index.to(device).long().reshape(-1)
        lo_hi = torch.stack([idx_img.min(), idx_img.max()]).tolist() if idx_img.numel() else []  # one sync
    else:  # host indices: checked on the host, sent in the one transfer below
        idx_host = torch.as_tensor(image_index).long().reshape(-1)
        lo_hi = [int(idx_host.min()), int(idx_host.max())] if idx_host.numel() else []
        idx_img = None
    n_idx = idx_img.numel() if idx_img is not None else idx_host.numel()
    if n_idx != F:
        raise ValueError(f"image_index has {n_idx} entries for {F} transforms")
    if F and not 0 <= lo_hi[0] <= lo_hi[1] < len(imgs):
        raise ValueError(f"image_index out of range for {len(imgs)} images")
    if F == 0:
        return torch.zeros((F, S, S, C), dtype=torch.uint8, device=device)

    # Per image: height, width, first pixel in the concatenated buffer (host ints, one transfer with the indices).
    hs = [int(im.shape[0]) for im in imgs]
    ws = [int(im.shape[1]) for im in imgs]
    starts = [0]
    for h, w in zip(hs[:-1], ws[:-1], strict=True):
        starts.append(starts[-1] + h * w)
    B = len(imgs)
    host = torch.tensor([*hs, *ws, *starts], dtype=torch.int64)
    if idx_img is None:
        host = torch.cat([host, idx_host])
    table = host.to(device, non_blocking=True)
    if idx_img is None:
        idx_img = table[3 * B :]
    table = table[: 3 * B].view(3, B)
    img_h, img_w, img_start = table[0][idx_img], table[1][idx_img], table[2][idx_img]  # (F,) int64

    # Inverse (crop -> source) in float64, as OpenCV does, on the small (F, 2, 3) tensor.
    Mi = invert_affine(M.to(torch.float64))
    # Non-finite or absurd (|entry| > 1e6) inverses: sample (-4, -4) everywhere, outside the image, so black.
    # Bounding the entries keeps every coordinate below finite and far from int64 overflow.
    bad = ~(torch.isfinite(Mi) & (Mi.abs() < 1e6)).all(dim=2).all(dim=1)
    Mi = torch.where(bad[:, None, None], 0.0, Mi)
    Mi[:, :, 2] = torch.where(bad[:, None], -4.0, Mi[:, :, 2])

    # OpenCV's arithmetic: per output row y the term (float)(M1·y + M2) in double, then M0·x + that in float32.
    grid = torch.arange(S, device=device, dtype=torch.float64)
    row_x = (Mi[:, 0, 1, None] * grid + Mi[:, 0, 2, None]).float()  # (F, S) indexed by output y
    row_y = (Mi[:, 1, 1, None] * grid + Mi[:, 1, 2, None]).float()
    m0, m3 = Mi[:, 0, 0].float(), Mi[:, 1, 0].float()
    gx = grid.float()
    # Bounds of the sampled region from the output grid's corners (an affine map's extremes), in float32 like
    # the samples themselves; floor(min)-1 .. floor(max)+2 leaves a safety pixel for rounding.
    cx = m0[:, None, None] * gx[[0, -1]][None, None, :] + row_x[:, [0, -1], None]  # (F, 2, 2)
    cy = m3[:, None, None] * gx[[0, -1]][None, None, :] + row_y[:, [0, -1], None]
    hw_w, hw_h = img_w.float(), img_h.float()
    # Clipped to the image; a region entirely outside becomes a 1-pixel region that no sample reaches.
    x_lo = torch.minimum(torch.clamp(torch.floor(cx.amin(dim=(1, 2))) - 1, min=0), hw_w - 1)
    x_hi = torch.minimum(torch.clamp(torch.floor(cx.amax(dim=(1, 2))) + 2, min=0), hw_w - 1)
    y_lo = torch.minimum(torch.clamp(torch.floor(cy.amin(dim=(1, 2))) - 1, min=0), hw_h - 1)
    y_hi = torch.minimum(torch.clamp(torch.floor(cy.amax(dim=(1, 2))) + 2, min=0), hw_h - 1)
    cw, ch = (x_hi - x_lo + 1).long(), (y_hi - y_lo + 1).long()
    gather_images = cuda_paths(device, tuning)
    if gather_images:
        # All images in one buffer of 4-byte pixels (RGB padded), so one int32 gather fetches a whole pixel (much
        # faster than 3-byte rows) and every face of the batch samples from it: no per-face copies.
        pix = torch.cat([im.reshape(-1, C) for im in imgs])
        if C < 4:
            pix = torch.nn.functional.pad(pix, (0, 4 - C))
        origin = img_start + y_lo.long() * img_w + x_lo.long()  # (F,) flat index of the region's first pixel
        row_stride = img_w
    else:
        # CPU: padding whole images to 4 bytes per pixel costs more than the warp (~1 ms per photo); copy only
        # the sampled regions instead, one slice per face (cheap on CPU; one bounds transfer, no device).
        # A 2-pixel zero border around every region makes any sample outside it read zeros without masks.
        row_stride = cw + 2 * _PAD
        n_pix = row_stride * (ch + 2 * _PAD)
        base = torch.cumsum(n_pix, 0) - n_pix
        origin = base + _PAD * row_stride + _PAD
        plan = torch.stack([x_lo.long(), y_lo.long(), cw, ch, idx_img, base], dim=1).tolist()
        total = plan[-1][5] + (plan[-1][2] + 2 * _PAD) * (plan[-1][3] + 2 * _PAD)
        pix = torch.zeros((total, 4), dtype=torch.uint8, device=device)
        for x0, y0, w, h, i, start in plan:
            dst = pix[start : start + (w + 2 * _PAD) * (h + 2 * _PAD)].view(h + 2 * _PAD, w + 2 * _PAD, 4)
            dst[_PAD : _PAD + h, _PAD : _PAD + w, :C].copy_(imgs[i][y0 : y0 + h, x0 : x0 + w])
    buf32 = pix.view(torch.int32).view(-1)

    # Fold the region origin into the row terms (exact: subtracting an integer from a float32 coordinate), so
    # the samples are computed relative to the region as they always were (identical float rounding).
    row_x = row_x - x_lo[:, None]
    row_y = row_y - y_lo[:, None]

    if max_samples_per_chunk is None:
        max_samples_per_chunk = 2**24 if gather_images else 2**18
    step = max(1, max_samples_per_chunk // (S * S))
    out = torch.empty((F, S, S, C), dtype=torch.uint8, device=device)  # every chunk writes all of its faces
    flat_out = out.view(F, S * S, C)
    for f0 in range(0, F, step):
        sl = slice(f0, min(F, f0 + step))
        sx = m0[sl, None, None] * gx + row_x[sl, :, None]  # (f, S, S): [face, out y, out x]
        sy = m3[sl, None, None] * gx + row_y[sl, :, None]
        fx0, fy0 = torch.floor(sx), torch.floor(sy)
        ax = (sx - fx0).reshape(-1, 1)
        ay = (sy - fy0).reshape(-1, 1)
        # Neighbours (ix + dx, iy + dy), relative to the region: an image pixel inside the region (which lies
        # inside the image), else black (OpenCV's BORDER_CONSTANT). Clamped first, so that far-outside samples
        # stay small integers whose neighbours are all outside.
        w_, h_ = cw[sl, None, None], ch[sl, None, None]
        ix = torch.minimum(torch.clamp(fx0.long(), min=-_PAD), w_)  # (f, S, S)
        iy = torch.minimum(torch.clamp(fy0.long(), min=-_PAD), h_)
        stride = row_stride[sl, None, None]
        i00 = origin[sl, None, None] + iy * stride + ix  # (f, S, S) flat index of the top-left neighbour
        i4 = torch.stack([i00, i00 + 1, i00 + stride, i00 + stride + 1], dim=-1).reshape(-1, 4)
        if gather_images:  # no zero border around the regions: mask the neighbours outside
            in_x = torch.stack([(ix >= 0) & (ix < w_), (ix >= -1) & (ix < w_ - 1)], dim=-1)  # (f, S, S, 2)
            in_y = torch.stack([(iy >= 0) & (iy < h_), (iy >= -1) & (iy < h_ - 1)], dim=-1)
            inside = (in_y[..., :, None] & in_x[..., None, :]).reshape(-1, 4)  # same order as i4
            p = torch.where(inside, torch.take(buf32, torch.where(inside, i4, 0)), 0)
        else:
            p = torch.take(buf32, i4)  # the zero border supplies the outside neighbours
        p = p.view(torch.uint8).view(-1, 4, 4)[..., :C].float()  # (n, 4 neighbours, C)
        # OpenCV's lerp order: along x on both rows, then along y.
        v0 = p[:, 0] + ax * (p[:, 1] - p[:, 0])
        v1 = p[:, 2] + ax * (p[:, 3] - p[:, 2])
        v = v0 + ay * (v1 - v0)
        flat_out[sl] = torch.round(v).clamp_(0, 255).to(torch.uint8).view(-1, S * S, C)
    return out


def align_faces(images, image_index, landmarks, size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """ArcFace-align faces: fit landmarks ``(F, 5, 2)`` to :func:`arcface_template` and :func:`warp_faces`.

    Returns ``(crops (F, size, size, C) uint8, M (F, 2, 3) float32)``, both on the images' device.
    """
    imgs = _as_image_list(images)
    device = imgs[0].device if imgs else torch.device("cpu")
    lm = torch.as_tensor(landmarks, device=device)
    M = estimate_similarity(lm.reshape(-1, 5, 2), arcface_template(size, device=device)).float()
    return warp_faces(imgs, image_index, M, size), M
