"""The real mxnet 1.9.1, in its own virtual environment, to cross-check ``packer.recordio`` against.

This file has two roles:

- Imported (tests, benchmarks; main environment): :func:`mxnet_python` builds the reference venv once and returns
  its interpreter; :func:`run_jobs` runs this file with that interpreter on a list of jobs.
- Run as a script by the reference venv's python (``python mxnet_env.py JOBS.json``): executes the jobs with
  mxnet. That side imports only the standard library, numpy and mxnet, never ``packer``.

The venv holds ``PINS`` (mxnet 1.9.1 imports on Python 3.11 only with numpy<1.24 and an OpenCV built for numpy 1).
It lives in ``$XDG_CACHE_HOME/gpu-align`` (default ``~/.cache/gpu-align``) under a name keyed by the pins and the
Python version, is built in a temporary folder and renamed into place when it imports, under a file lock; a build
that was killed is never reused. ``GPU_ALIGN_MXNET_PYTHON`` names a base Python 3.11 to build it with.
Without network the build fails with a message; tests then fail, unless ``GPU_ALIGN_SKIP_MXNET=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PINS = ("mxnet==1.9.1", "numpy==1.23.5", "opencv-python-headless==4.11.0.86")
PYTHON_VERSION = (3, 11)
SKIP_ENV = "GPU_ALIGN_SKIP_MXNET"
_READY = "gpu-align-ready"  # written last, before the rename: its presence means the venv is complete


class MxnetUnavailable(RuntimeError):
    """The reference mxnet venv cannot be built or run here; the message says why and what to do."""


# ------------------------------------------------------------------------------------ main-environment side


def venv_dir() -> Path:
    """Where the reference venv lives: keyed by the pins and the Python version."""
    key = hashlib.sha256(" ".join((*PINS, "py{}.{}".format(*PYTHON_VERSION))).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-align"
    return cache / f"mxnet-venv-{key}"


def _base_python() -> str:
    want = "{}.{}".format(*PYTHON_VERSION)
    if exe := os.environ.get("GPU_ALIGN_MXNET_PYTHON"):
        return exe
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable  # `-m venv` from inside a venv builds on its base interpreter
    if exe := shutil.which(f"python{want}"):
        return exe
    raise MxnetUnavailable(
        f"mxnet 1.9.1 needs Python {want} (numpy 1.23.5 has no wheels for newer Pythons); none found: "
        f"install python{want} or set GPU_ALIGN_MXNET_PYTHON, or set {SKIP_ENV}=1 to skip the mxnet cross-checks"
    )


def _run(cmd: list[str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MxnetUnavailable(f"{what}: timed out after {timeout:.0f} s ({' '.join(cmd)})") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise MxnetUnavailable(
            f"{what} failed (exit {proc.returncode}); is PyPI reachable? Set {SKIP_ENV}=1 to skip the mxnet "
            f"cross-checks explicitly.\n$ {' '.join(cmd)}\n{tail}"
        )


def mxnet_python(timeout: float = 900) -> Path:
    """The reference venv's python, building the venv first if needed (~1 min with network, then cached).

    Raises :class:`MxnetUnavailable` with pip's output when it cannot be built.
    """
    import fcntl

    dest = venv_dir()
    python = dest / "bin" / "python"
    if (dest / _READY).is_file():
        return python
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be building it right now
        if (dest / _READY).is_file():
            return python
        # We hold the lock, so any leftover build folder is from a build that was killed: never reuse it.
        for stale in [dest, *dest.parent.glob(f"{dest.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
        start = time.monotonic()
        try:
            _run([_base_python(), "-m", "venv", str(tmp)], "creating the mxnet venv", 120)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            _run([*pip, "--timeout", "60", *PINS], f"pip install {' '.join(PINS)}", timeout)
            check = "import mxnet, numpy, cv2; print(mxnet.__version__, numpy.__version__, cv2.__version__)"
            _run([str(tmp / "bin" / "python"), "-c", check], "importing mxnet in its venv", 120)
            (tmp / _READY).write_text(f"{' '.join(PINS)}\nbuilt in {time.monotonic() - start:.0f} s\n")
            os.rename(tmp, dest)  # atomic: dest exists only complete (the venv runs from any path via bin/python)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python


def run_jobs(python: Path, jobs: list[dict], workdir: Path, timeout: float = 300) -> list:
    """Run ``jobs`` with mxnet (this file as a script under ``python``); returns each job's JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), __file__, str(spec)], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"the mxnet driver failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- shared by both sides


def make_label(spec):
    """A label value from its JSON description (same on both sides), to exercise every type ``pack`` sees.

    ``spec`` is a number, a list, or ``{"np": dtype, "value": v}`` (numpy scalar) /
    ``{"array": dtype, "value": nested list}`` (ndarray, 0-d included) / ``{"tuple": [...]}``.
    """
    import numpy as np

    if isinstance(spec, dict):
        if "np" in spec:
            return np.dtype(spec["np"]).type(spec["value"])
        if "array" in spec:
            return np.array(spec["value"], dtype=spec["array"])
        if "tuple" in spec:
            return tuple(spec["tuple"])
        if "bool" in spec:
            return bool(spec["bool"])
    return spec


def header_json(header) -> list:
    """An unpacked IRHeader as JSON: ``[flag, label (float or list of floats), id, id2]``."""
    label = header.label
    label = [float(x) for x in label] if hasattr(label, "__len__") else float(label)
    return [int(header.flag), label, int(header.id), int(header.id2)]


# ------------------------------------------------------------------------------------------ mxnet side


def _slices(blob: bytes, lengths: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in lengths:
        out.append(blob[pos : pos + n])
        pos += n
    return out


def _job_write(job: dict) -> dict:
    """Write records with mxnet: raw payloads (``header`` null) or ``recordio.pack(IRHeader(*header), body)``."""
    from mxnet import recordio

    bodies = _slices(Path(job["blob"]).read_bytes(), job["lengths"])
    rec = (
        recordio.MXIndexedRecordIO(job["idx"], job["rec"], "w")
        if job.get("idx")
        else recordio.MXRecordIO(job["rec"], "w")
    )
    tells, packed = [], []
    for key, header, body in zip(job["keys"], job["headers"], bodies, strict=True):
        payload = body
        if header is not None:
            flag, label, id_, id2 = header
            payload = recordio.pack(recordio.IRHeader(flag, make_label(label), id_, id2), body)
        packed.append(payload)
        if job.get("idx"):
            tells.append(rec.tell())
            rec.write_idx(key, payload)
        else:
            rec.write(payload)
    rec.close()
    if job.get("packed_out"):
        Path(job["packed_out"]).write_bytes(b"".join(packed))
    return {"tells": tells, "packed_lengths": [len(p) for p in packed]}


def _job_read(job: dict) -> dict:
    """Read a file with mxnet: every record in sequence, then every key with read_idx; unpack them all."""
    from mxnet import recordio

    out = []
    if job.get("idx"):
        rec = recordio.MXIndexedRecordIO(job["idx"], job["rec"], "r")
        keys = list(rec.keys)
    else:
        rec = recordio.MXRecordIO(job["rec"], "r")
        keys = []
    seq = []
    while (item := rec.read()) is not None:
        seq.append(item)
    by_key = []
    for key in keys:
        rec.reset()  # mxnet 1.9.1 cannot seek after reaching the end of the file (sticky end-of-stream flag)
        by_key.append(rec.read_idx(key))
    rec.close()
    for item in seq + by_key:
        out.append(item)
    Path(job["out_blob"]).write_bytes(b"".join(out))
    headers, body_lengths = [], []
    if job.get("unpack"):
        for item in seq:
            header, body = recordio.unpack(item)
            headers.append(header_json(header))
            body_lengths.append(len(body))
    return {
        "keys": keys,
        "seq_lengths": [len(x) for x in seq],
        "key_lengths": [len(x) for x in by_key],
        "headers": headers,
        "body_lengths": body_lengths,
    }


def _job_img(job: dict) -> dict:
    """pack_img an image (``.npy``, BGR) and unpack_img a payload, with mxnet's functions."""
    import numpy as np
    from mxnet import recordio

    result = {}
    if job.get("image"):
        img = np.load(job["image"])
        flag, label, id_, id2 = job["header"]
        header = recordio.IRHeader(flag, make_label(label), id_, id2)
        Path(job["packed_out"]).write_bytes(recordio.pack_img(header, img, job["quality"], job["img_fmt"]))
    if job.get("payload"):
        header, img = recordio.unpack_img(Path(job["payload"]).read_bytes(), job.get("iscolor", -1))
        np.save(job["image_out"], img)
        result["header"] = header_json(header)
    return result


def _best_of(fn, repeat: int) -> dict:
    """Best wall-clock and best CPU seconds (this process, user + system) of ``repeat`` runs of ``fn``."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return {"seconds": wall, "cpu_seconds": cpu}


def _job_bench_write(job: dict) -> dict:
    """Time mxnet's MXIndexedRecordIO writing the given payloads with write_idx (keys 0..n-1)."""
    from mxnet import recordio

    payloads = _slices(Path(job["blob"]).read_bytes(), job["lengths"])

    def write():
        rec = recordio.MXIndexedRecordIO(job["idx"], job["rec"], "w")
        for key, payload in enumerate(payloads):
            rec.write_idx(key, payload)
        rec.close()

    return _best_of(write, job.get("repeat", 3))


def _job_bench_read(job: dict) -> dict:
    """Time mxnet reading every record by key (read_idx + unpack)."""
    from mxnet import recordio

    def read():
        rec = recordio.MXIndexedRecordIO(job["idx"], job["rec"], "r")
        for key in rec.keys:
            recordio.unpack(rec.read_idx(key))
        rec.close()

    return _best_of(read, job.get("repeat", 3))


def read_like_insightface(recordio, idx_path: str, rec_path: str) -> tuple[dict, list[bytes]]:
    """Read a dataset exactly as InsightFace's training code does (arcface_torch ``MXFaceDataset``), with the
    given ``recordio`` module (mxnet's or ours): record 0's header gives keys 1..label[0]-1, otherwise all keys;
    each label is ``label[0]`` when it is a list. Returns a JSON summary and the image bodies."""
    import numpy as np

    rec = recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    s = rec.read_idx(0)
    header, _ = recordio.unpack(s)
    if header.flag > 0:  # noqa: SIM108 - written as in arcface_torch
        imgidx = np.array(range(1, int(header.label[0])))
    else:
        imgidx = np.array(list(rec.keys))
    items, bodies = [], []
    for idx in imgidx:  # numpy integers, as in MXFaceDataset.__getitem__
        h, img = recordio.unpack(rec.read_idx(idx))
        label = h.label
        if not isinstance(label, numbers.Number):
            label = label[0]
        items.append({"key": int(idx), "label": float(label), "header": header_json(h), "body_length": len(img)})
        bodies.append(img)
    keys = [int(k) for k in rec.keys]
    rec.close()
    return {"header0": header_json(header), "items": items, "keys": keys}, bodies


def _job_insightface_read(job: dict) -> dict:
    """:func:`read_like_insightface` with mxnet; also decodes the first ``decode`` images with
    ``mx.image.imdecode`` (RGB, as training does) and returns their per-channel means."""
    import mxnet as mx
    from mxnet import recordio

    summary, bodies = read_like_insightface(recordio, job["idx"], job["rec"])
    Path(job["out_blob"]).write_bytes(b"".join(bodies))
    n = job.get("decode", 0)
    summary["rgb_means"] = [mx.image.imdecode(b).asnumpy().reshape(-1, 3).mean(0).tolist() for b in bodies[:n]]
    return summary


_JOBS = {
    "write": _job_write,
    "read": _job_read,
    "img": _job_img,
    "bench_write": _job_bench_write,
    "bench_read": _job_bench_read,
    "insightface_read": _job_insightface_read,
}


def _main(spec_path: str) -> None:
    import logging

    logging.disable(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON result line
        import mxnet

        assert mxnet.__version__ == "1.9.1", mxnet.__version__
        results = [_JOBS[job["op"]](job) for job in json.loads(Path(spec_path).read_text())]
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])
