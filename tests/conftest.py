"""Shared test fixtures: real shipped photos, and CUDA tests that skip cleanly without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpu_align.demo import photos
from tests import mxnet_env


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def _photo_path(name: str):
    try:
        return photos.photo_path(name)
    except photos.PhotoMissing as e:
        # Only Debian's opencv-doc (messi5.jpg) is optional; the set-up script installs the others.
        if name == "messi":
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def photo_path():
    """``photo_path(name)`` -> Path of a shipped photo (see gpu_align.demo.photos)."""
    return _photo_path


@pytest.fixture(scope="session")
def photos_rgb() -> dict[str, np.ndarray]:
    """Every shipped photo (faces, scenes without faces, the 14×25 GIF), name -> (H, W, 3) uint8 RGB, read-only.

    Loaded once per session for all test files; messi (Debian's opencv-doc) is left out where it is not installed,
    a missing photo of the other packages fails. Tests pick photos by name (see gpu_align.demo.photos).
    """
    out = {}
    for name in (*photos.FACE_PHOTOS, *photos.NON_FACE_PHOTOS, "tiny"):
        try:
            _photo_path(name)
        except pytest.skip.Exception:
            continue
        img = photos.load_rgb(name)
        img.setflags(write=False)  # shared by every test: a test that writes into it fails instead of leaking
        out[name] = img
    return out


@pytest.fixture(scope="session")
def load_photo():
    """``load_photo(name)`` -> (H, W, 3) uint8 RGB numpy array of a shipped photo."""

    def load(name: str) -> np.ndarray:
        _photo_path(name)
        return photos.load_rgb(name)

    return load


@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """Python of the reference mxnet 1.9.1 venv (built once, cached); a failure to build it fails the test."""
    if os.environ.get(mxnet_env.SKIP_ENV) == "1":
        pytest.skip(f"{mxnet_env.SKIP_ENV}=1: mxnet cross-checks skipped on request")
    try:
        return mxnet_env.mxnet_python()
    except mxnet_env.MxnetUnavailable as e:
        pytest.fail(f"cannot build the reference mxnet venv: {e}", pytrace=False)


@pytest.fixture(scope="module")
def ids() -> list[tuple[str, list[bytes]]]:
    """The identities the dataset-tool tests share: ``[(name, [jpeg bytes, ...]), ...]``, ``tools_fixtures.COUNTS``
    112×112 crops of one real photo per identity (built once per session, a fresh copy of the lists per module).
    Imported here, not at the top: the many tests that do not use it need not load OpenCV."""
    import tools_fixtures  # the module the tool tests import (tests/ is on sys.path), so one cache serves all

    return tools_fixtures.identities(tools_fixtures.COUNTS)
