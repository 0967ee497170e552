"""Real face photos that installed packages ship (no downloads): used by the demo, the tests and the benchmarks.

Sources (see README, "Test photos"):
- scikit-image: ``astronaut.png`` (one face, 512×512), ``camera.png`` (grayscale, one face), and non-face scenes.
- insightface wheel (installed ``--no-deps``, only its data is used): ``t1.jpg`` (six faces), ``Tom_Hanks_54745.png``.
- Debian ``opencv-doc``: ``examples/data/messi5.jpg``.

Files are located through package metadata, never by importing the packages (insightface's import needs
onnxruntime, which we do not install).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shlex
import sys
from pathlib import Path

OPENCV_DOC_DATA = Path("/usr/share/doc/opencv-doc/examples/data")

# name -> (package, path inside the package); package None means an absolute path
_PHOTOS: dict[str, tuple[str | None, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "camera": ("skimage", "data/camera.png"),
    "t1": ("insightface", "data/images/t1.jpg"),
    "tom_hanks": ("insightface", "data/images/Tom_Hanks_54745.png"),
    "messi": (None, str(OPENCV_DOC_DATA / "messi5.jpg")),
    # scenes without faces (false-positive checks)
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    # a 14×25 GIF, smaller than the 20 px minimum face: an edge case, not a face
    "tiny": ("skimage", "data/no_time_for_that_tiny.gif"),
}

FACE_PHOTOS = ("astronaut", "camera", "t1", "tom_hanks", "messi")
NON_FACE_PHOTOS = ("coffee", "chelsea", "rocket")

# What installs each source (scripts/setup_env.sh does all three). pip runs as "<this python> -m pip" in the message,
# so the command works as printed whether or not the virtual environment is activated.
_HOW_TO_INSTALL = {
    "skimage": ("pip", "install scikit-image"),
    "insightface": ("pip", "install --no-deps insightface==2.1"),
    None: ("apt", "apt-get install --no-install-recommends opencv-doc"),
}
_WHAT = {"skimage": "scikit-image", "insightface": "insightface's wheel", None: "Debian's opencv-doc"}


def install_hint(package: str | None) -> str:
    """The command that installs the photos of ``package`` (None: Debian's opencv-doc), runnable as printed."""
    kind, args = _HOW_TO_INSTALL[package]
    if kind == "pip":
        return f"{shlex.quote(sys.executable)} -m pip {args}"
    return args + " (as root)"


class PhotoMissing(FileNotFoundError):
    """A shipped photo is not installed on this machine; the message says how to install it."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds a top-level package without importing it
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def photo_path(name: str) -> Path:
    """Path of a shipped photo by name (see ``_PHOTOS``); raises :class:`PhotoMissing` with the install hint."""
    if name not in _PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(sorted(_PHOTOS))}")
    package, rel = _PHOTOS[name]
    base = Path("/") if package is None else _package_dir(package)
    path = None if base is None else base / rel
    if path is None or not path.is_file():
        where = "package not installed" if base is None else f"no {path}"
        raise PhotoMissing(
            f"photo {name!r} ({rel} from {_WHAT[package]}) is missing: {where}; install it with: "
            f"{install_hint(package)} (or run scripts/setup_env.sh)"
        )
    return path


def available(names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """The subset of ``names`` (default: all) that is installed, name -> path."""
    found = {}
    for name in names or tuple(_PHOTOS):
        with contextlib.suppress(PhotoMissing):
            found[name] = photo_path(name)
    return found


def load_rgb(name: str):
    """A shipped photo as an (H, W, 3) uint8 RGB numpy array (grayscale is expanded to 3 channels)."""
    import numpy as np
    from PIL import Image

    with Image.open(photo_path(name)) as im:
        return np.asarray(im.convert("RGB"))
