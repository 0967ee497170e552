"""Build a small VGGFace2-like demo dataset (``root/<identity>/<image>``) from the real face photos packages ship.

What is real and what is not: the installed packages ship only about ten real faces (``gpu_align.demo.photos``):
the six people of insightface's ``t1.jpg``, scikit-image's astronaut and cameraman, insightface's Tom Hanks crop
and, with Debian's opencv-doc, Messi. Each real face is one identity. Identities beyond that are *synthetic
variants* of those same faces: a fixed mirror, aspect stretch and colour cast per variant. They are the same person
to a face-recognition model; they exist only so the demo has tens of classes to pack, and the dataset is for
exercising the pipeline, not for training.

Every image contains its identity's face, upright as displayed: the real face (with its hair and surroundings)
warped to a random scale, position near the centre and small in-plane rotation, either cropped in its own photo
(single-face photos) or pasted with a soft edge onto a background (gradients, noise, and face-free scikit-image
scenes), so MTCNN finds it and no other face competes with it. Images vary the way web photos do:
150-800 px per side, JPEG quality 55-95, some grayscale, some PNG, some stored rotated with an EXIF orientation
tag (decoders must apply it), brightness/contrast/colour shifts. One identity has a non-ASCII name.

Deterministic for a seed (each image draws from its own seeded generator, so thread scheduling does not matter)
and fast (about 260 images in under 5 s on 2 cores). Without Debian's opencv-doc (Messi) there are nine real
faces, so identity 10 onwards shift to other sources: the same seed gives the same dataset only on machines with
the same photos installed.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from gpu_align.demo import photos
from gpu_align.errors import UserError

# Face boxes (x1, y1, x2, y2) in the shipped photos and the roll of the eye line in degrees (positive: the right
# eye lower), found once with MTCNN (gpu_align.detect.mtcnn, default settings).
_FACES: list[tuple[str, str, tuple[int, int, int, int], float]] = [
    # (photo, description, box, roll)
    ("astronaut", "scikit-image astronaut.png", (181, 62, 268, 172), 3),
    ("camera", "scikit-image camera.png (grayscale)", (199, 119, 254, 192), 9),
    ("t1", "insightface t1.jpg, face 1 (back right)", (908, 62, 1014, 202), -11),
    ("t1", "insightface t1.jpg, face 2 (left)", (55, 263, 165, 397), -32),
    ("t1", "insightface t1.jpg, face 3 (centre right)", (743, 346, 844, 474), 5),
    ("t1", "insightface t1.jpg, face 4 (back left)", (268, 150, 375, 272), -36),
    ("t1", "insightface t1.jpg, face 5 (centre left)", (465, 262, 570, 405), 15),
    ("t1", "insightface t1.jpg, face 6 (right)", (1135, 276, 1228, 395), -1),
    ("tom_hanks", "insightface Tom_Hanks_54745.png (a 112x112 aligned crop)", (0, 0, 112, 112), -2),
    ("messi", "opencv-doc messi5.jpg", (227, 94, 254, 132), -5),
]
# photos with one face: may be cropped in context; from t1 only the face region is pasted (no second face)
_SINGLE_FACE = {"astronaut", "camera", "tom_hanks", "messi"}
_BACKGROUNDS = ("coffee", "rocket")  # face-free scenes (chelsea is a cat: a face-like distraction, not used)
UNICODE_IDENTITY = "n000004_Zoë_Ødegård_李"


@dataclass
class DemoSummary:
    """What :func:`build_demo_dataset` wrote."""

    root: Path
    identities: list[str]  # folder names, sorted
    counts: dict[str, int]  # images per identity
    sources: dict[str, str]  # identity -> the real face it shows (and "synthetic variant ..." where it is one)
    # relative path (posix) -> face box (x1, y1, x2, y2) in the image as displayed (EXIF orientation applied)
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    exif_rotated: int = 0
    grayscale: int = 0
    png: int = 0
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return (
            f"{self.images} images of {len(self.identities)} identities in {self.root} "
            f"({self.exif_rotated} EXIF-rotated, {self.grayscale} grayscale, {self.png} PNG; {self.seconds:.1f} s)"
        )


@dataclass(frozen=True)
class _Source:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    box: tuple[int, int, int, int]
    roll: float  # degrees
    single_face: bool
    description: str


@dataclass(frozen=True)
class _Identity:
    name: str
    source: int
    variant: int  # 0: the real face as shipped; >= 1: a synthetic variant
    gains: tuple[float, float, float]  # colour cast of the variant (per RGB channel)
    stretch: float  # horizontal aspect stretch of the variant
    mirror: bool


def _load_sources() -> list[_Source]:
    cache: dict[str, np.ndarray] = {}
    sources = []
    for name, description, box, roll in _FACES:
        try:
            if name not in cache:
                cache[name] = photos.load_rgb(name)
        except photos.PhotoMissing as e:
            if name == "messi":  # Debian's opencv-doc is optional
                continue
            raise UserError(f"the demo needs the face photos that installed packages ship: {e}") from None
        sources.append(_Source(cache[name], box, roll, name in _SINGLE_FACE, description))
    return sources


def _identities(n: int, sources: list[_Source], seed: int) -> list[_Identity]:
    rng = np.random.default_rng([seed, 1])
    out = []
    for i in range(n):
        src, variant = i % len(sources), i // len(sources)
        name = UNICODE_IDENTITY if i == 3 else f"n{i + 1:06d}"
        if variant == 0:
            out.append(_Identity(name, src, 0, (1.0, 1.0, 1.0), 1.0, False))
        else:
            gains = tuple(float(g) for g in rng.uniform(0.8, 1.2, 3))
            out.append(_Identity(name, src, variant, gains, float(rng.uniform(0.88, 1.12)), bool(variant % 2)))
    return out


def _background(rng: np.random.Generator, h: int, w: int, scenes: list[np.ndarray]) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colours at a random angle (made small, resized: it is linear)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:17, 0:17].astype(np.float32)
        t = xx * np.cos(ang) + yy * np.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        small = (a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    if kind == 1:  # smooth colour noise
        small = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    scene = scenes[int(rng.integers(len(scenes)))]  # a random crop of a face-free photo
    sh, sw = scene.shape[:2]
    ch, cw = int(sh * rng.uniform(0.4, 1.0)), int(sw * rng.uniform(0.4, 1.0))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    return cv2.resize(scene[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA)


def _inside(m: np.ndarray, w: int, h: int, shape: tuple[int, ...]) -> bool:
    """Whether the canvas (w, h) maps back inside the source photo, up to 3 % of its size (replicated border)."""
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64) @ inv[:, :2].T + inv[:, 2]
    tol = 0.03 * np.array([shape[1], shape[0]])
    return bool((corners >= -tol).all() and (corners <= np.array([shape[1], shape[0]]) + tol).all())


def _render(
    rng: np.random.Generator, src: _Source, ident: _Identity, scenes: list[np.ndarray]
) -> tuple[np.ndarray, tuple[float, float, float, float], bool]:
    """One displayed (upright) image: ((H, W, 3) uint8 RGB, face box in it, whether it is grayscale)."""
    h = int(rng.integers(150, 801))
    w = int(np.clip(h * rng.uniform(0.75, 1.33), 150, 800))
    x1, y1, x2, y2 = src.box
    bw, bh = x2 - x1, y2 - y1
    face_w = float(np.clip(rng.uniform(0.28, 0.55) * min(h, w), 48, 4 * bw))
    scale = face_w / bw
    image = src.image
    if scale < 1:  # downscale with area averaging first (a bilinear warp would alias)
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        x1, y1, x2, y2, bw, bh = (v * scale for v in (x1, y1, x2, y2, bw, bh))
        scale = 1.0
    # source -> canvas: scale (with the variant's stretch) and rotate about the face centre, centre near the middle
    angle = np.deg2rad(-0.6 * src.roll + rng.uniform(-8, 8))  # strongly tilted heads (t1) partly levelled
    sx, sy = scale * ident.stretch, scale
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lin = rot @ np.diag([sx, sy])
    half = np.abs(lin) @ np.array([bw / 2, bh / 2])  # half-extent of the rotated face box
    lo, hi = half + 4, np.array([w, h]) - half - 4
    centre = np.array([w, h]) / 2 + rng.uniform(-0.12, 0.12, 2) * np.array([w, h])
    centre = np.clip(centre, lo, np.maximum(lo, hi))
    c_src = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    m = np.hstack([lin, (centre - lin @ c_src)[:, None]]).astype(np.float32)
    flags = cv2.INTER_LINEAR
    if src.single_face and rng.random() < 0.6 and _inside(m, w, h, image.shape):
        out = cv2.warpAffine(image, m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)  # a crop in context
    else:  # the face region pasted with a soft elliptical edge onto a background
        warped = cv2.warpAffine(image, m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        mask = np.zeros(image.shape[:2], np.float32)
        margin = 0.45 if not src.single_face else rng.uniform(0.4, 0.8)
        axes = (int(bw * (0.5 + margin)), int(bh * (0.5 + margin)))
        cv2.ellipse(mask, (int(c_src[0]), int(c_src[1])), axes, 0, 0, 360, 1.0, -1)
        # soft edge: warp and blur the mask at quarter resolution, then upsample (a full-size blur is slow)
        q = np.diag([0.25, 0.25]).astype(np.float32)
        small = cv2.warpAffine(mask, q @ m, ((w + 3) // 4, (h + 3) // 4), flags=flags, borderValue=0)
        small = cv2.GaussianBlur(small, (0, 0), max(0.5, face_w * 0.02))
        mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        out = cv2.blendLinear(warped, _background(rng, h, w, scenes), mask, 1 - mask)
    # photometric: contrast, brightness, per-image colour balance on top of the variant's cast, gamma: one
    # per-channel lookup table
    v = np.arange(256, dtype=np.float64)[:, None]
    gains = np.array(ident.gains) * rng.uniform(0.92, 1.08, 3)
    v = np.clip(((v - 128) * rng.uniform(0.8, 1.2) + 128 + rng.uniform(-20, 20)) * gains, 0, 255)
    lut = (255 * (v / 255) ** rng.uniform(0.8, 1.25)).astype(np.uint8)  # (256, 3)
    out = cv2.LUT(out, lut[None])
    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]) @ m[:, :2].T + m[:, 2]
    box = [*corners.min(0), *corners.max(0)]
    if ident.mirror != (rng.random() < 0.5):  # the variant's mirror, and random flips
        out = np.ascontiguousarray(out[:, ::-1])
        box = [w - box[2], box[1], w - box[0], box[3]]
    grey = src.description.endswith("(grayscale)") or rng.random() < 0.03
    if grey:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return out, (round(box[0], 1), round(box[1], 1), round(box[2], 1), round(box[3], 1)), grey


# Pillow transpose that undoes each EXIF orientation's display transform: stored = op(displayed)
_STORE_OP = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_90",  # displayed after a 90° clockwise turn, so stored turned 90° counter-clockwise
    7: "TRANSVERSE",
    8: "ROTATE_270",
}


def _encode(rng: np.random.Generator, image: np.ndarray, grey: bool) -> tuple[bytes, str, int, bool]:
    """(file bytes, extension, EXIF orientation written (1 = none), is PNG)."""
    if rng.random() < 0.06:  # PNG
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        assert ok
        return buf.tobytes(), ".png", 1, True
    quality = int(rng.integers(55, 96))
    ext = ".jpeg" if rng.random() < 0.03 else ".jpg"
    if rng.random() < 0.12:  # stored rotated/mirrored, with the EXIF tag that displays it upright
        import io

        from PIL import Image

        orientation = int(rng.choice([3, 6, 8, 6, 8, 2, 4, 5, 7]))
        pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if grey else image))
        pil = pil.transpose(getattr(Image.Transpose, _STORE_OP[orientation]))
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality, exif=exif)
        return buf.getvalue(), ext, orientation, False
    if grey:
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(image[..., :1]), quality=quality, colorspace="GRAY")
    else:
        data = simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")
    return data, ext, 1, False


def build_demo_dataset(
    root: str | os.PathLike,
    *,
    identities: int = 24,
    images_per_identity: int = 12,
    seed: int = 0,
    overwrite: bool = False,
    threads: int | None = None,
) -> DemoSummary:
    """Write ``root/<identity>/<NNNN_KK>.jpg`` (a few ``.png`` / ``.jpeg``) and return what was written.

    ``identities``: number of identity folders (the first ~10 are the real faces, the rest synthetic variants,
    see the module docstring). ``images_per_identity``: the mean count; each identity gets 50-150 % of it (at least
    2), as real datasets are uneven. Same ``seed`` -> byte-identical files. A non-empty ``root`` is a
    :class:`UserError` unless ``overwrite`` (then only this builder's identity folders are replaced).
    """
    if identities < 1 or images_per_identity < 1:
        raise UserError("demo dataset needs at least 1 identity and 1 image per identity")
    start = time.perf_counter()
    root = Path(root)
    sources = _load_sources()
    idents = _identities(identities, sources, seed)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"{root} is not empty; choose an empty folder (or overwrite)")
        for ident in idents:
            shutil.rmtree(root / ident.name, ignore_errors=True)
    try:
        scenes = [photos.load_rgb(n) for n in _BACKGROUNDS]
    except photos.PhotoMissing as e:
        raise UserError(f"the demo needs the background scenes scikit-image ships: {e}") from None
    count_rng = np.random.default_rng([seed, 2])
    counts = [max(2, round(images_per_identity * count_rng.uniform(0.5, 1.5))) for _ in idents]

    def make(job: tuple[int, int]):
        i, k = job
        rng = np.random.default_rng([seed, 3, i, k])
        ident = idents[i]
        image, box, grey = _render(rng, sources[ident.source], ident, scenes)
        data, ext, orientation, png = _encode(rng, image, grey)
        rel = f"{ident.name}/{i + 1:04d}_{k + 1:02d}{ext}"
        (root / rel).write_bytes(data)
        return rel, box, grey, orientation != 1, png

    for ident in idents:
        (root / ident.name).mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i, n in enumerate(counts) for k in range(n)]
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # OpenCV and the JPEG encoders release the GIL
        results = list(pool.map(make, jobs))

    summary = DemoSummary(
        root=root,
        identities=sorted(ident.name for ident in idents),
        counts={ident.name: n for ident, n in zip(idents, counts, strict=True)},
        sources={},
    )
    for ident in idents:
        desc = sources[ident.source].description
        if ident.variant:
            desc += f"; synthetic variant {ident.variant} (colour cast, stretch {ident.stretch:.2f}"
            desc += ", mirrored)" if ident.mirror else ")"
        summary.sources[ident.name] = desc
    for rel, box, grey, rotated, png in results:
        summary.boxes[rel] = box
        summary.grayscale += grey
        summary.exif_rotated += rotated
        summary.png += png
    summary.seconds = time.perf_counter() - start
    return summary
