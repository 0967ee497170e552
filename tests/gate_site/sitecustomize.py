"""Test-only: holds a subprocess's pack at a chosen point, so a test signals a process that is provably mid-run.

A test puts this folder on the subprocess's ``PYTHONPATH`` and describes the gate in ``GPU_ALIGN_TEST_GATE``
(see ``tests/pack_gate.py``); without that variable this file does nothing. With it, :class:`DatasetWriter`
commits at every identity boundary, and the first time the process reaches the gate it writes ``<dir>/reached``
(the committed state as the gate found it) and waits there: for ``run``'s stop event when it is ``run``'s packer
process (set when the main process is told to stop), else until a signal (Ctrl-C raises here; SIGKILL ends it).
Gates (``"at"``):

- ``commit``: after a commit whose state has ``done >= spec["done"]`` and, if given, ``phase == spec["phase"]``;
- ``finalize-records``: the finalize phase wrote its records (meta records or the shuffled copy), nothing else;
- ``replace``: right after the output ``spec["name"]`` was renamed into place (the rename phase, part-way).

``spec["until"] = "killed"``: ``run``'s packer ignores the stop event too (for a test that SIGKILLs the packer).

Nothing here changes what is written; only when the process is where the test wants it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

_SPEC = json.loads(os.environ.get("GPU_ALIGN_TEST_GATE") or "null")
_stop = None  # run's packer: the event its parent sets to stop it (captured from packer.channel._write_batch)
_held = False  # a gate holds once: the writer's own abort (it commits) then runs through


def _hold(out_dir: Path) -> None:
    """Say where we are (atomically), then wait to be stopped."""
    global _held
    if _held:
        return
    _held = True
    gate = Path(_SPEC["dir"])
    state = (out_dir / "pack.state.json").read_text()
    (gate / "reached.tmp").write_text(state)
    os.replace(gate / "reached.tmp", gate / "reached")
    timeout = float(_SPEC.get("timeout", 120))
    deadline = time.monotonic() + timeout
    # Short sleeps, never the event's own wait(): a process killed inside multiprocessing.Event.wait() leaves the
    # event's condition expecting it, and the parent's next set() blocks forever. And a signal that lands on
    # another thread (pack's read-ahead pool) is only handled once this thread wakes up: Ctrl-C raises
    # KeyboardInterrupt here, and the writer aborts as from any other point.
    # spec["until"] == "killed": not even is_set(), which holds the event's lock for a moment: a SIGKILL then
    # would leave it locked for good (and the parent's set() blocked on it).
    stop = None if _SPEC.get("until") == "killed" else _stop
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return  # run's packer now stops at its next input, as it would have without the gate
        time.sleep(0.02)
    raise RuntimeError(f"test gate {_SPEC}: nobody stopped this process within {timeout} s")


def _matches(out_dir: Path) -> bool:
    state = json.loads((out_dir / "pack.state.json").read_bytes())
    phase = _SPEC.get("phase")
    return state["done"] >= int(_SPEC.get("done", 0)) and (phase is None or state["phase"] == phase)


def _install() -> None:
    global _stop
    import packer.channel
    from packer.layout import DatasetWriter

    init, commit, finalize_records = DatasetWriter.__init__, DatasetWriter._commit, DatasetWriter._finalize_records

    @functools.wraps(init)
    def gated_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.commit_interval = 0.0  # commit at every identity boundary: every identity is a point a gate can hold

    @functools.wraps(commit)
    def gated_commit(self):
        commit(self)
        if _SPEC["at"] == "commit" and _matches(self.out_dir):
            _hold(self.out_dir)

    @functools.wraps(finalize_records)
    def gated_finalize_records(self):
        outputs = finalize_records(self)
        if _SPEC["at"] == "finalize-records":
            _hold(self.out_dir)
        return outputs

    DatasetWriter.__init__, DatasetWriter._commit = gated_init, gated_commit
    DatasetWriter._finalize_records = gated_finalize_records

    replace = os.replace

    def gated_replace(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        dst = Path(dst)
        if _SPEC["at"] == "replace" and dst.name == _SPEC["name"] and (dst.parent / "pack.state.json").exists():
            _hold(dst.parent)

    os.replace = gated_replace

    write_batch = packer.channel._write_batch

    @functools.wraps(write_batch)
    def watching_write_batch(writer, batch, encoded, crops_root, stats, stop=None):
        global _stop
        _stop = stop
        return write_batch(writer, batch, encoded, crops_root, stats, stop)

    packer.channel._write_batch = watching_write_batch


if _SPEC:
    _install()
