"""FaceAligner: batched MTCNN detection + ArcFace alignment of photos of any sizes, one target face per photo.

>>> from gpu_align import FaceAligner
>>> aligner = FaceAligner(device="cuda")           # or "cpu": same code, same results
>>> res = aligner.align([img0, img1, img2])        # (H, W, 3) uint8 RGB numpy arrays or torch tensors
>>> res.crops[res.found]                           # (n, 112, 112, 3) uint8 on the device

Dataset mode: every photo is meant to hold one target face. A face-selection policy (``gpu_align.detect.select``)
picks it among the detections at or above a confidence floor, and the runner-up of a multi-face photo is
returned too; a photo without a (confident) face is reported in ``miss_reason`` and, with ``on_miss="center"``,
gets InsightFace's old centre-crop fallback, flagged in ``center``. Nothing raises for one bad photo.

Same results on CPU and GPU: every network call runs inside :func:`gpu_align.device.full_fp32` (TF32 off for the
duration of the call, the caller's settings restored afterwards; the settings are process-global, so other threads'
float32 convolutions also run in full precision meanwhile), and ``fp16`` never touches O-Net's landmark regression.

Landmarks are the detector's raw ones (for MTCNN: exactly InsightFace's reference alignment); O-Net refinement
(``refine=True``) is experimental.

Detection scale policy: ``min_face_rel`` sets the smallest face searched for relative to the photo's shorter
side (``max(min_face_size, min_face_rel · min(H, W))`` pixels per photo). MTCNN's image pyramid starts at
``12 / min_face``, so on a large photo a relative minimum skips the largest, most expensive pyramid levels,
which only find faces too small to be the target of a dataset photo.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gpu_align.align.rows import Rows
from gpu_align.align.warp import (
    ARCFACE_112,
    arcface_template,
    center_crop_affine,
    center_crop_landmarks,
    estimate_similarity,
    invert_affine,
    transform_points,
    warp_faces,
)
from gpu_align.detect import DETECTORS, Detections, FaceDetector, empty_detections, make_detector
from gpu_align.detect.mtcnn import MTCNN
from gpu_align.detect.select import POLICIES, SelectFn, Selection, select_faces
from gpu_align.device import (
    StageClock,
    check_device,
    full_fp32,
    host_to_device,
    out_of_memory_stops,
    require_cuda,
    to_device,
)
from gpu_align.errors import DetectorError, UserError

ON_MISS = ("skip", "center")
MISS_NO_FACE = "no face"
MISS_TOO_SMALL = "image too small"
# The rule that lets a train.lst line reproduce a centre-crop fallback. The line keeps face2rec2's format (box,
# ten landmark numbers), so a fallback is written with the whole photo as its box and, as its landmarks, the
# template mapped back through its affine (center_crop_landmarks). On a non-square photo that affine scales x and y
# differently, so the similarity fitted to those landmarks gives another crop. Hence: a *given* face (a .lst's,
# or any detections= entry) whose ten numbers all lie within CENTER_MATCH_PX of the centre-crop landmarks of its
# photo's decoded size is that photo's centre crop again: warped with the centre-crop affine and reported as a
# centre crop (center True, found False, whatever on_miss is). The tolerance is one 1/100 px step of the .lst's
# rounding (which moves a number by at most 0.005 px, plus float noise); no real face lands there on all ten
# numbers, and detected faces are never compared.
CENTER_MATCH_PX = 0.01
MISS_GIVEN_CENTER = f"{MISS_NO_FACE}: the given landmarks are the centre crop's"


@dataclass
class AlignResult:
    """One aligned face (or a recorded miss) per input image; tensors on the aligner's device.

    Attributes:
        crops: ``(B, S, S, 3)`` uint8 RGB; all zeros where ``ok`` is False.
        found: ``(B,)`` bool, a face was detected and aligned.
        center: ``(B,)`` bool, the crop is the centre-crop fallback: ``on_miss="center"`` and no face found, or a
            given face that is a centre crop's landmarks (:data:`CENTER_MATCH_PX`), whatever ``on_miss``.
        boxes: ``(B, 4)`` float32 x1 y1 x2 y2 of the selected face in the input image's pixels; NaN if none.
        landmarks: ``(B, 5, 2)`` float32 (x, y) eyeL eyeR nose mouthL mouthR; NaN if none.
        scores: ``(B,)`` float32 detection confidence; NaN if none.
        num_faces: ``(B,)`` int64, faces detected in the image (before selection).
        num_confident: ``(B,)`` int64, faces at or above the score floor (the candidates); ≥ 2 = multi-face photo.
        runner_up_boxes: ``(B, 4)`` float32, the face the policy ranked second among the confident ones; NaN if none.
        runner_up_scores: ``(B,)`` float32, its confidence; NaN if none.
        transforms: ``(B, 2, 3)`` float32 image->crop affine used for the crop; NaN where there is no crop.
        seconds: time per stage (``detect``, ``refine``, ``warp``) when the aligner is ``timed``, else empty.
        miss_reason: per image ``None`` (found) or why not, ``"<category>[: detail]"`` as the run report counts
            them: ``"no face"``, ``"image too small: ..."``, ``"unsupported image: ..."`` (kept for centre-crop
            fallbacks, which say why they fell back).
    """

    crops: torch.Tensor
    found: torch.Tensor
    center: torch.Tensor
    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    num_faces: torch.Tensor
    transforms: torch.Tensor
    miss_reason: list[str | None]
    num_confident: torch.Tensor | None = None
    runner_up_boxes: torch.Tensor | None = None
    runner_up_scores: torch.Tensor | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> torch.Tensor:
        """``(B,)`` bool: the image has a crop (an aligned face or a centre-crop fallback)."""
        return self.found | self.center

    def __len__(self) -> int:
        return len(self.miss_reason)


@dataclass
class _Batch:
    """The per-photo state of one :meth:`FaceAligner.align` call: ``B`` entries per list, in input order.

    Attributes:
        images: ``(H, W, 3)`` uint8 tensors on the aligner's device; None where the input is unusable.
        reasons: why a photo has no crop (the future ``AlignResult.miss_reason``); the steps fill it in.
        given: the caller's faces for a photo (moved to the device when used); None: detect it.
        usable: the rows with an image, in the compacted order that refinement and the warp read them.
        detected: the usable rows without given faces (detected, and refined, here).
    """

    images: list[torch.Tensor | None]
    reasons: list[str | None]
    given: list[Detections | None]
    usable: Rows = field(init=False)
    detected: Rows = field(init=False)

    def __post_init__(self) -> None:
        self.usable = Rows.where(im is not None for im in self.images)
        self.detected = Rows.where(im is not None and g is None for im, g in zip(self.images, self.given, strict=True))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def hw(self) -> list[tuple[int, int]]:
        """``(H, W)`` per row; ``(1, 1)`` for an unusable one (it has no faces to select)."""
        return [(im.shape[0], im.shape[1]) if im is not None else (1, 1) for im in self.images]


# --- landmark refinement ----------------------------------------------------------------------------------------

# Where O-Net's 48×48 input crops (R-Net's square boxes) put the five points: the ArcFace template's shape at
# 48/112 scale, 3 px higher (measured on MTCNN's own detections of the shipped photos: inter-ocular distance
# 0.31 of the crop side in both).
_ONET_TEMPLATE = tuple((x * 48 / 112, y * 48 / 112 - 3.0) for x, y in ARCFACE_112)
# Roll angles (degrees) of the views per refinement round: one upright view first (it mostly removes the roll),
# then two rounds of a ±6° pair, averaging O-Net's view-dependent errors. Each view also runs mirrored: 10 O-Net
# evaluations per face. (Tuned on 4 × 100 face-trials of the shipped photos: this schedule keeps 97.2 %
# within 5 % of the IOD; 3 views/5 views (18 evaluations) 96.7 %, ((0,), (-8, 0, 8)) 94.0 %, no refinement ~30 %.
# On held-out faces it is less accurate than the raw landmarks: README, "Accuracy".)
REFINE_SCHEDULE: tuple[tuple[float, ...], ...] = ((0.0,), (-6.0, 6.0), (-6.0, 6.0))
_MIRROR = (1, 0, 2, 4, 3)  # landmark order after a horizontal flip: eyes and mouth corners swap


def refine_landmarks(
    onet: torch.nn.Module,
    images: Sequence[torch.Tensor],
    image_index,
    landmarks: torch.Tensor,
    schedule: Sequence[Sequence[float]] = REFINE_SCHEDULE,
    supersample: int = 2,
) -> torch.Tensor:
    """Re-estimate 5-point landmarks with MTCNN's O-Net on upright, similarity-normalised crops (experimental).

    Off by default (``FaceAligner(refine=True)`` / ``--landmarks refined`` turn it on): its schedule and O-Net
    framing were tuned on the shipped photos, where it looks better, but on held-out hand-labelled faces its
    landmarks are less accurate than MTCNN's raw ones (README, "Accuracy"; ``benchmarks/bench_accuracy.py``).

    MTCNN's landmarks come from O-Net run on an axis-aligned box, so they move with the box quantisation, the
    pyramid level and the face's roll: on the shipped photos under random ±30° rotations, 0.5–2× scaling and
    JPEG re-encoding they agree with the transformed originals within 5 % of the inter-ocular distance only ~30 %
    of the time (median error 7 %). Each refinement round warps a 48×48 crop that puts the current landmarks on
    O-Net's typical framing (so the face is upright and at O-Net's training scale whatever the photo's geometry),
    runs O-Net on it at a few roll angles and mirrored, maps the predictions back through the exact inverse
    warps and averages them. That makes the landmarks (nearly) equivariant: median error 0.4 %, ~97 % within
    5 % (tests/test_aligner.py); the rest are faces MTCNN misses or mislocates at large total roll (photo
    rotation + the face's own tilt) and camera.png's near-profile face, whose far eye is hidden.

    Args:
        onet: MTCNN's O-Net (``(N, 3, 48, 48)`` normalised → regression, ``(N, 10)`` landmarks in [0, 1] of
            the crop (x1..x5, y1..y5), probability).
        images: the ``(H, W, 3)`` uint8 images on the device.
        image_index: ``(F,)`` image of each face.
        landmarks: ``(F, 5, 2)`` float initial landmarks (e.g. MTCNN's), image pixels.
        schedule: roll angles per round (see ``REFINE_SCHEDULE``).
        supersample: crops are warped at ``48·k`` and box-averaged to 48 (anti-aliasing for large faces).

    Returns:
        ``(F, 5, 2)`` float32 landmarks on the images' device.
    """
    n_faces = landmarks.shape[0]
    if n_faces == 0 or not schedule:
        return landmarks.float()
    device = landmarks.device
    weight = next(onet.parameters())
    dtype = weight.dtype
    # feed O-Net in its weights' memory format (channels-last on CPU): no conversion inside every conv
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    k = int(supersample)
    L = landmarks.to(torch.float64)
    idx = host_to_device(image_index, device).long()
    tmpl = host_to_device(_ONET_TEMPLATE, device, torch.float64)
    centre = 23.5  # of the 48×48 crop (pixel centres 0..47)
    # crop pixel u (0..47) -> supersampled pixel k·u + (k-1)/2 (same pixel-centre convention)
    up = host_to_device([[k, 0.0, (k - 1) / 2], [0.0, k, (k - 1) / 2]], device, torch.float64)
    for angles in schedule:
        n_v = len(angles)
        T = estimate_similarity(L, tmpl)  # (F, 2, 3) image -> 48 crop
        rad = host_to_device([math.radians(a) for a in angles], device, torch.float64)
        cos, sin = torch.cos(rad), torch.sin(rad)
        # view v: rotate the crop about its centre, then supersample: (F·V, 2, 3) image -> 48k crop
        R = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (V, 2, 2)
        Rt = centre - R @ torch.full((n_v, 2, 1), centre, dtype=torch.float64, device=device)
        V = torch.cat([R, Rt], 2)
        TV = _compose(V[None], T[:, None]).reshape(-1, 2, 3)
        crops = warp_faces(images, idx.repeat_interleave(n_v), _compose(up, TV).float(), 48 * k)
        x = crops.permute(0, 3, 1, 2).float()
        if k > 1:
            x = F.avg_pool2d(x, k)
        x = ((x - 127.5) * 0.0078125).to(dtype)
        x = torch.cat([x, x.flip(-1)]).contiguous(memory_format=memory_format)
        _, pts, _ = onet(x)
        pts = pts.to(torch.float64)
        u = torch.stack([pts[:, :5], pts[:, 5:]], -1) * 48 - 0.5  # (2·F·V, 5, 2) crop pixels; [0, 1] spans the crop
        m = x.shape[0] // 2
        mirrored = u[m:, list(_MIRROR)].clone()
        mirrored[..., 0] = 47.0 - mirrored[..., 0]
        u = torch.stack([u[:m], mirrored], 1)  # (F·V, 2, 5, 2)
        back = transform_points(invert_affine(TV)[:, None].expand(-1, 2, 2, 3).reshape(-1, 2, 3), u.reshape(-1, 5, 2))
        L = back.reshape(n_faces, n_v * 2, 5, 2).mean(1)
    return L.float()


def _compose(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Affine ``A ∘ B`` for broadcastable ``(..., 2, 3)`` matrices (apply B first)."""
    R = A[..., :2] @ B[..., :2]
    t = (A[..., :2] @ B[..., 2:])[..., 0] + A[..., 2]
    return torch.cat([R, t[..., None]], -1)


def _check_options(
    select: str | SelectFn, on_miss: str, min_face_rel: float | None, detector: str, min_score: float | None
) -> None:
    """Refuse :class:`FaceAligner` options out of range, one line each, before any model loads."""
    if not callable(select) and select not in POLICIES:
        raise UserError(f"unknown face-selection policy {select!r}; choose one of {', '.join(POLICIES)}")
    if on_miss not in ON_MISS:
        raise UserError(f"on_miss must be one of {', '.join(ON_MISS)}, got {on_miss!r}")
    if min_face_rel is not None and not 0 <= min_face_rel < 1:
        raise UserError(f"min_face_rel must be in [0, 1), got {min_face_rel}")
    if detector not in DETECTORS:
        raise DetectorError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if min_score is not None and not 0 <= min_score <= 1:
        raise UserError(f"min_score must be in [0, 1], got {min_score}")


class FaceAligner:
    """Batched face detection (MTCNN by default) and ArcFace alignment on CPU or CUDA.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; everything (detector, warp, outputs) runs there.
        detector: ``"mtcnn"`` (default; what InsightFace's datasets were aligned with), ``"cascade"``
            (Viola–Jones box + O-Net landmarks) or ``"retinaface"`` (see :mod:`gpu_align.detect`).
        image_size: crop side ``S``: 112·k (ArcFace template scaled) or 128·k (wider margin), see
            :func:`gpu_align.align.warp.arcface_template`.
        select: face-selection policy, one of ``"center-largest"`` (default; InsightFace's align scripts),
            ``"largest"``, ``"best-score"``, ``"center"``, or a callable
            (see :func:`gpu_align.detect.select.select_faces`).
        min_face_rel: smallest face searched for, relative to each photo's shorter side (0 or None: off, every face
            down to ``min_face_size`` pixels). The default 0.1 suits dataset photos (the target face is much larger)
            and speeds up large photos; use 0 to find small faces in group photos.
        min_score: confidence floor: a detection below it is never selected (None: the detector's
            ``score_floor``, 0.9 for MTCNN's O-Net probability; 0 turns the floor off).
        on_miss: ``"skip"`` (no crop, ``ok`` False) or ``"center"`` (InsightFace's centre-crop fallback, flagged).
        refine: experimental, off by default. Re-estimate the selected face's landmarks with O-Net on upright,
            normalised crops (:func:`refine_landmarks`). It makes landmarks follow rotations of the shipped photos
            it was tuned on, but on held-out hand-labelled faces it is *less* accurate than MTCNN's raw landmarks
            (README, "Accuracy"). False (default) gives the detector's raw landmarks: with MTCNN, exactly
            InsightFace's MTCNN + ``cv2.warpAffine`` alignment.
        fp16: run the detector's convolutions in float16 (CUDA only). Never O-Net (MTCNN's and the cascade's
            landmarks, refinement) nor RetinaFace's landmark head: they stay float32 (fp16 moved O-Net's landmarks
            ~0.25 px on a 500 px face; ``train.lst`` stores 0.01 px).
        channels_last: channels-last memory format for the detector's convolutions; None (default) lets MTCNN
            choose (on for CPU, where P-Net runs ~1.5× faster).
        landmark_decimals: round the landmarks to this many decimals before the fit (``gpu-align run`` uses 2,
            what ``train.lst`` holds, so that packing the ``.lst`` reproduces the crops bit for bit).
        timed: report per-stage seconds in ``AlignResult.seconds`` (CUDA events on a GPU, read lazily).
        **detector_options: passed to the detector (for MTCNN, :class:`gpu_align.detect.mtcnn.MTCNN`'s
            ``min_face_size``, ``thresholds``, ``scale_factor``, ``nms_thresholds``, ``weights_dir``, ...).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        image_size: int = 112,
        select: str | SelectFn = "center-largest",
        min_face_rel: float | None = 0.1,
        on_miss: str = "skip",
        refine: bool = False,
        detector: str = "mtcnn",
        min_score: float | None = None,
        fp16: bool = False,
        channels_last: bool | None = None,
        landmark_decimals: int | None = None,
        timed: bool = False,
        **detector_options,
    ) -> None:
        self.device = check_device(device, "device")  # cuda:N beyond the visible devices: one clear line
        if fp16:
            require_cuda(self.device, "fp16")
        _check_options(select, on_miss, min_face_rel, detector, min_score)
        try:
            self.template = arcface_template(int(image_size), device=self.device)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.image_size = int(image_size)
        self.select = select
        self.min_face_rel = float(min_face_rel or 0.0)
        self.on_miss = on_miss
        self.refine = bool(refine)
        self.fp16 = fp16
        self.channels_last = channels_last
        self.landmark_decimals = landmark_decimals
        self.timed = bool(timed)
        dtype = torch.float16 if fp16 else torch.float32
        self.detector: FaceDetector = make_detector(
            detector, device=self.device, dtype=dtype, channels_last=channels_last, **detector_options
        )
        # MTCNN's O-Net, for refinement: the detector's own where it has one, else made on first use
        self._mtcnn = self.detector if isinstance(self.detector, MTCNN) else getattr(self.detector, "mtcnn", None)
        self.min_score = float(self.detector.score_floor if min_score is None else min_score)
        self.min_face_size = float(detector_options.get("min_face_size", 20))
        # the warp takes the detector's code paths (MTCNN(tuning="cuda") on CPU: the CUDA ones)
        self._warp_tuning = "cuda" if getattr(self.detector, "cuda_paths", False) else None

    # -- inputs ----------------------------------------------------------------------------------------------

    def _prepare(self, images: Sequence) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """Each input as an ``(H, W, 3)`` uint8 tensor on the device, or None with the reason it is unusable.

        Grayscale ``(H, W)`` / ``(H, W, 1)`` is expanded to 3 channels and an alpha channel dropped.
        """
        out: list[torch.Tensor | None] = []
        reasons: list[str | None] = []
        for im in images:
            t, why = self._to_tensor(im)
            out.append(t)
            reasons.append(why)
        return out, reasons

    def _to_tensor(self, im) -> tuple[torch.Tensor | None, str | None]:
        if isinstance(im, torch.Tensor):
            t = im
        else:
            try:
                arr = np.ascontiguousarray(np.asarray(im))
            except Exception as e:  # an object numpy cannot read
                return None, f"unsupported image: {type(im).__name__} ({e})"
            with warnings.catch_warnings():  # read-only arrays (PIL, decoders): we never write into them
                warnings.simplefilter("ignore", UserWarning)
                try:
                    t = torch.from_numpy(arr)
                except TypeError:  # object arrays, unsupported dtypes
                    return None, f"unsupported image: {type(im).__name__} of dtype {arr.dtype}"
        if t.dtype != torch.uint8:
            return None, f"unsupported image: dtype {str(t.dtype).replace('torch.', '')} (expected uint8)"
        if t.dim() == 2:
            t = t.unsqueeze(-1)
        if t.dim() != 3 or t.shape[-1] not in (1, 3, 4):
            return None, f"unsupported image: shape {tuple(t.shape)} (expected (H, W, 3) RGB)"
        if t.shape[0] == 0 or t.shape[1] == 0:
            return None, f"unsupported image: empty, shape {tuple(t.shape)}"
        if t.shape[-1] == 1:
            t = t.expand(-1, -1, 3)
        elif t.shape[-1] == 4:
            t = t[..., :3]
        t = to_device(t, self.device)
        return (t if t.is_contiguous() else t.contiguous()), None

    def _batch(self, images: Sequence, detections: Sequence[Detections | None] | None) -> _Batch:
        imgs, reasons = self._prepare(images)
        given = [None] * len(imgs) if detections is None else list(detections)
        if len(given) != len(imgs):
            raise ValueError(f"{len(given)} detections for {len(imgs)} images")
        return _Batch(imgs, reasons, given)

    # -- detection -------------------------------------------------------------------------------------------

    def _min_faces(self, imgs: Sequence[torch.Tensor]) -> list[float]:
        return [max(self.min_face_size, self.min_face_rel * min(im.shape[0], im.shape[1])) for im in imgs]

    def _detect_prepared(self, imgs: list[torch.Tensor | None], reasons: list[str | None]) -> list[Detections]:
        """Detect in the usable images; too-small and unusable ones get empty detections (reason recorded).

        ``imgs``: per row an ``(H, W, 3)`` uint8 device tensor or None (not detected); ``reasons`` is updated
        in place. Returns one :class:`Detections` per row, on the device.
        """
        too_small = [im is not None and min(im.shape[0], im.shape[1]) < self.min_face_size for im in imgs]
        for i in Rows.where(too_small):
            h, w = imgs[i].shape[:2]
            reasons[i] = f"{MISS_TOO_SMALL}: {w}×{h} < {self.min_face_size:g} px face"
        todo = Rows.where(im is not None and not small for im, small in zip(imgs, too_small, strict=True))
        empty = [empty_detections(self.device) for _ in imgs]
        if not todo:
            return empty
        batch = todo.take(imgs)
        with torch.inference_mode(), full_fp32(), out_of_memory_stops("detecting faces in", len(todo), self.device):
            found = self.detector.detect(batch, min_face_sizes=self._min_faces(batch))
        # a detector that knows why it found nothing says so (cascade: no box, or O-Net rejected it)
        why = getattr(self.detector, "last_miss_reasons", None) or [None] * len(todo)
        for i, w in zip(todo, why, strict=True):
            if w:
                reasons[i] = f"{MISS_NO_FACE}: {w}"
        return todo.scatter(found, empty)

    def _faces(self, batch: _Batch) -> list[Detections]:
        """Per row: the given faces (moved to the device), else those detected now; empty where unusable."""
        detected = self._detect_prepared(batch.detected.only(batch.images), batch.reasons)
        return [
            Detections(*(to_device(x, self.device) for x in g)) if i in batch.usable and g is not None else d
            for i, (g, d) in enumerate(zip(batch.given, detected, strict=True))
        ]

    def detect(self, images: Sequence) -> list[Detections]:
        """All faces per image (after the ``min_face_rel`` scale policy), as :class:`gpu_align.detect.mtcnn.Detections`.

        ``images``: list of ``(H, W, 3)`` uint8 RGB numpy arrays or tensors, any sizes. Unusable or too small
        images give empty detections. Boxes/landmarks are in each image's pixel coordinates, on the device.
        """
        imgs, reasons = self._prepare(images)
        dets = self._detect_prepared(imgs, reasons)
        counts = [len(d.scores) for d in dets]
        if not self.refine or sum(counts) == 0:
            return dets
        usable = Rows.where(im is not None for im in imgs)
        owner = usable.positions(i for i, c in enumerate(counts) for _ in range(c))  # each face's image
        refined = self._refine(usable.take(imgs), owner, torch.cat([d.landmarks for d in dets])).split(counts)
        return [Detections(d.boxes, d.scores, lm) for d, lm in zip(dets, refined, strict=True)]

    @property
    def mtcnn(self) -> MTCNN:
        """The MTCNN whose O-Net refines landmarks: the detector itself for ``detector="mtcnn"``."""
        if self._mtcnn is None:
            self._mtcnn = MTCNN(device=self.device, dtype=torch.float16 if self.fp16 else torch.float32)
        return self._mtcnn

    def _refine(self, imgs: list[torch.Tensor], image_index: list[int], landmarks: torch.Tensor) -> torch.Tensor:
        """:func:`refine_landmarks` with MTCNN's O-Net: ``(F, 5, 2)`` float32 on the device."""
        with torch.inference_mode(), full_fp32(), out_of_memory_stops("refining landmarks in", len(imgs), self.device):
            return refine_landmarks(self.mtcnn.onet, imgs, image_index, landmarks)

    # -- alignment -------------------------------------------------------------------------------------------

    def _final_landmarks(self, batch: _Batch, landmarks: torch.Tensor, found: Rows) -> torch.Tensor:
        """The selected faces' ``(B, 5, 2)`` float32 landmarks, refined (detected faces only; given landmarks are
        final) and rounded as asked. ``landmarks`` is updated in place where refined."""
        refine = found & batch.detected if self.refine else None
        if refine:  # the selected face only
            rows = refine.index(self.device)
            sources = batch.usable
            landmarks[rows] = self._refine(sources.take(batch.images), sources.positions(refine), landmarks[rows])
        if self.landmark_decimals is not None:  # what a .lst holds, so that it reproduces these crops
            scale = 10.0**self.landmark_decimals
            landmarks = torch.round(landmarks * scale) / scale
        return landmarks

    def _given_center_crops(self, batch: _Batch, sel: Selection) -> torch.Tensor | None:
        """``(B,)`` bool on the device: the rows whose selected *given* face is its photo's centre crop (the rule
        at :data:`CENTER_MATCH_PX`); None when no row has given faces. One host->device copy, no sync."""
        given = batch.usable - batch.detected
        if not given:
            return None
        hw = batch.hw
        expected = center_crop_landmarks([h for h, _ in hw], [w for _, w in hw], self.image_size).to(self.device)
        near = ((sel.landmarks - expected).abs() <= CENTER_MATCH_PX).flatten(1).all(1)  # NaN: False
        return near & sel.found & given.mask(self.device)

    def _explain_misses(self, batch: _Batch, found: Rows, sel: Selection) -> None:
        """Set each row's ``miss_reason``: None where a face was found; else the reason known so far, or "no face"
        (with the best score when every detection fell below the floor). Two host reads."""
        faces, best = sel.num_faces.tolist(), sel.best_score.tolist()
        for i in range(len(batch)):
            if i in found:
                batch.reasons[i] = None
            elif batch.reasons[i] is None:
                low = faces[i] > 0  # faces were detected, all below the floor
                batch.reasons[i] = (
                    f"{MISS_NO_FACE}: low confidence ({best[i]:.2f} < {self.min_score:g})" if low else MISS_NO_FACE
                )

    @staticmethod
    def _drop_faces(sel: Selection, rows: torch.Tensor) -> Selection:
        """``sel`` with no face at ``rows`` (``(B,)`` bool on the device): not found, NaN box/score/landmarks."""
        nan = float("nan")
        return sel._replace(
            found=sel.found & ~rows,
            boxes=torch.where(rows[:, None], nan, sel.boxes),
            scores=torch.where(rows, nan, sel.scores),
            landmarks=torch.where(rows[:, None, None], nan, sel.landmarks),
        )

    def _transforms(self, batch: _Batch, landmarks: torch.Tensor, found: Rows, center: Rows) -> torch.Tensor:
        """``(B, 2, 3)`` float32 image→crop affines on the device: the landmark fit for ``found`` rows, the
        centre-crop fallback for ``center`` rows, NaN elsewhere."""
        transforms = torch.full((len(batch), 2, 3), float("nan"), device=self.device)
        if found:
            rows = found.index(self.device)
            transforms[rows] = estimate_similarity(landmarks[rows], self.template).float()
        if center:
            hw = center.take(batch.hw)
            fallback = center_crop_affine([h for h, _ in hw], [w for _, w in hw], self.image_size)
            transforms[center.index(self.device)] = fallback.to(self.device)
        return transforms

    def _warp(self, batch: _Batch, transforms: torch.Tensor, ok: Rows) -> torch.Tensor:
        """``(B, S, S, 3)`` uint8 crops on the device (zeros outside ``ok``): one batched warp of the
        full-resolution images."""
        S = self.image_size
        crops = torch.zeros((len(batch), S, S, 3), dtype=torch.uint8, device=self.device)
        if ok:
            rows, sources = ok.index(self.device), batch.usable
            crops[rows] = warp_faces(
                sources.take(batch.images), sources.positions(ok), transforms[rows], S, tuning=self._warp_tuning
            )
        return crops

    def align(self, images: Sequence, detections: Sequence[Detections | None] | None = None) -> AlignResult:
        """Detect, select one face per image and warp it to the ArcFace template, for a batch of any sizes.

        Args:
            images: list of ``(H, W, 3)`` uint8 RGB numpy arrays or tensors (any device, mixed sizes);
                grayscale and RGBA are converted.
            detections: optional faces per image, used as given (e.g. :meth:`detect`'s output, or landmarks from
                a ``.lst``); an image whose entry is None is detected, and only its selected face is refined.
                A given face whose landmarks are its photo's centre-crop landmarks gets the centre crop
                (:data:`CENTER_MATCH_PX`: how a ``train.lst`` line reproduces a fallback).

        Returns:
            :class:`AlignResult` with ``B = len(images)`` rows, tensors on the aligner's device. All crops of
            the batch come from one batched warp of the full-resolution images. With ``timed``, ``seconds``
            holds the time of each stage (detect, refine, warp).
        """
        clock = StageClock(self.device, self.timed)
        batch = self._batch(images, detections)
        dets = self._faces(batch)
        clock.lap("detect")
        # the floor applies to given faces too: align(x, detect(x)) == align(x); a .lst's faces score 1
        sel = select_faces(dets, batch.hw, self.select, min_score=self.min_score)
        given_center = self._given_center_crops(batch, sel)
        if given_center is None:
            found = Rows.where(sel.found.tolist())  # only usable photos have faces
            given_centers = Rows.where([False] * len(batch))
        else:  # the same one host read for both
            found_host, center_host = torch.stack([sel.found, given_center]).tolist()
            given_centers = Rows.where(center_host)  # given centre crops: centre crops again, not faces
            found = Rows.where(found_host) - given_centers
            sel = self._drop_faces(sel, given_center)
            for i in given_centers:
                batch.reasons[i] = MISS_GIVEN_CENTER
        landmarks = self._final_landmarks(batch, sel.landmarks, found)
        clock.lap("refine")
        self._explain_misses(batch, found, sel)
        center = batch.usable - found if self.on_miss == "center" else given_centers
        transforms = self._transforms(batch, landmarks, found, center)
        crops = self._warp(batch, transforms, found | center)
        clock.lap("warp")
        return AlignResult(
            crops=crops,
            found=sel.found,
            center=center.mask(self.device),
            boxes=sel.boxes,
            landmarks=landmarks,
            scores=sel.scores,
            num_faces=sel.num_faces,
            transforms=transforms,
            miss_reason=batch.reasons,
            num_confident=sel.num_confident,
            runner_up_boxes=sel.runner_up_boxes,
            runner_up_scores=sel.runner_up_scores,
            seconds=clock.seconds,
        )
