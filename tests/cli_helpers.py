"""The project's commands as real subprocesses (``python -m gpu_align`` / ``python -m packer``), and the datasets
they write read back and compared: shared by the end-to-end tests so each file does not copy them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from packer import recordio

REPO = Path(__file__).resolve().parents[1]
# the files of a finished dataset that must be byte-identical between two runs of the same input (report.json and
# report.html name the run's own times and folders)
OUTPUTS = ("train.rec", "train.idx", "train.lst", "property")


def command(module: str, *args: object) -> list[str]:
    """``python -m module args...`` with this interpreter (paths given as ``Path`` are fine)."""
    return [sys.executable, "-m", module, *map(str, args)]


def start(module: str, *args: object, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start ``python -m module args...`` in the repository, in its own process group (a signal sent to the group
    reaches its packer process too, as a terminal's does), unbuffered, stdout and stderr piped; ``env`` is added to
    this environment, ``kw`` goes to ``Popen`` (``preexec_fn``, ``text``...)."""
    return subprocess.Popen(
        command(module, *args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        start_new_session=True,
        **kw,
    )


def run_module(module: str, *args: object, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args...`` in the repository to its end (text output captured, ``timeout`` seconds at
    most: a hang fails the test); ``kw`` goes to ``subprocess.run``."""
    return subprocess.run(command(module, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(stderr: str, prog: str = "python -m packer") -> str:
    """The single non-blank line of ``stderr``, checked to be ``prog``'s one-line error without a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def records(out: Path) -> dict[int, tuple[recordio.IRHeader, bytes]]:
    """Every record of ``out/train.rec`` by key, in ``train.idx`` order: ``{key: (header, body)}``; a key listed twice
    in ``train.idx`` fails (so ``list(records(out))`` is the index's key column exactly)."""
    with recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "r") as r:
        recs = {k: recordio.unpack(r.read_idx(k)) for k in r.keys}
        assert len(recs) == len(r.keys), f"{out / 'train.idx'} lists a key twice"
        return recs


def same_outputs(a: Path, b: Path) -> None:
    """Assert the datasets in ``a`` and ``b`` have byte-identical ``OUTPUTS``."""
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
