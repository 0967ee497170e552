"""Stop a subprocess's pack at a chosen point, deterministically (tests/gate_site/sitecustomize.py does the work).

    gate = Gate.at(tmp_path, "commit", done=30)
    proc = subprocess.Popen(cmd, env=dict(os.environ, **gate.env()))
    state = gate.wait(proc)        # returns once the process is held there: its committed pack state
    proc.send_signal(signal.SIGKILL)

The held process waits until it is signalled (or, as ``run``'s packer, until its parent tells it to stop), so the
signal always finds it mid-run: no sleep races the process.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SITE = Path(__file__).resolve().with_name("gate_site")
_REPO = _SITE.parents[1]
_ids = itertools.count()


@dataclass(frozen=True)
class Gate:
    dir: Path
    spec: dict[str, Any]

    @classmethod
    def at(cls, tmp: Path, at: str, **spec: Any) -> Gate:
        """A gate ``at`` ``"commit"`` (``done=``, ``phase=``), ``"finalize-records"`` or ``"replace"`` (``name=``);
        ``until="killed"``: run's packer waits for its kill, not for its stop event (see gate_site/sitecustomize)."""
        d = tmp / f"gate-{os.getpid()}-{next(_ids)}"
        d.mkdir(parents=True)
        return cls(d, {"at": at, **spec})

    def env(self) -> dict[str, str]:
        """The variables to add to the subprocess's environment."""
        path = [str(_SITE), str(_REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        spec = json.dumps({"dir": str(self.dir), **self.spec})
        return {"GPU_ALIGN_TEST_GATE": spec, "PYTHONPATH": os.pathsep.join(path)}

    def wait(self, proc: subprocess.Popen, timeout: float = 120) -> dict:
        """Block until ``proc`` is held at the gate; return the pack state it committed there."""
        reached = self.dir / "reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the process ended before it reached the gate {self.spec}: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the process did not reach the gate {self.spec} within {timeout} s")
            time.sleep(0.01)  # only waits for the gate; the process stays there until it is signalled
        return json.loads(reached.read_text())
