"""The set-up and demo experience: setup_env.sh reruns are fast no-ops and keep a CPU torch on CPU machines; the
demo names a missing photo with a command that installs it; the commands the demo prints run as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_align.cli import run as gpu_align
from gpu_align.commands.demo import self_command

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup_env.sh"


def _setup(*args: str, cwd: Path = REPO, script: Path = SETUP) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_ALIGN_SKIP_APT": "1"}  # never apt-get from a test
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_setup_rerun_is_a_fast_noop():
    """After a set-up, the check finds nothing to install, and a rerun runs no pip (~0.2 s)."""
    check = _setup("--check", "dev,demo")
    if check.stdout.startswith("missing: project ("):  # setup.cfg/pyproject edited since (pytest run directly)
        done = _setup("dev,demo")  # what scripts/test.sh does first: reinstall the project (~15 s), nothing else
        assert done.returncode == 0, done.stdout + done.stderr
        check = _setup("--check", "dev,demo")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("nothing to install") and "torch=2.13.0" in check.stdout
    if shutil.which("nvidia-smi") is None:  # no GPU: the pinned torch must be the CPU build
        assert "cuda=none" in check.stdout, check.stdout
    t0 = time.perf_counter()
    rerun = _setup("dev,demo")
    seconds = time.perf_counter() - t0
    assert rerun.returncode == 0 and rerun.stdout == "" and rerun.stderr == "", rerun.stdout + rerun.stderr
    assert seconds < 5, f"a set-up rerun with nothing to install took {seconds:.1f} s"


def test_setup_check_sees_a_foreign_install(tmp_path):
    """The editable install belongs to this checkout: a copy of the repo using the same .venv must reinstall."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    check = _setup("--check", "dev", cwd=tmp_path, script=tmp_path / "scripts" / "setup_env.sh")
    assert check.returncode == 1 and check.stdout.startswith("missing: project"), check.stdout + check.stderr


def test_demo_names_the_missing_photo_and_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "insightface", None)  # as if insightface's wheel were not installed
    assert gpu_align(["demo", "--out", str(tmp_path / "demo"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "photo 't1'" in err and "insightface's wheel" in err
    command = f"{shlex.quote(sys.executable)} -m pip install --no-deps insightface==2.1"
    assert command in err
    assert Path(sys.executable).is_file()  # the command names this interpreter: it works without an activated venv
    assert not (tmp_path / "demo" / "photos").exists() or not any((tmp_path / "demo" / "photos").iterdir())


def test_self_command(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "gpu-align"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert self_command("bin/gpu-align") == "bin/gpu-align"  # started by path, not on PATH: that path
    assert self_command(str(exe)) == "bin/gpu-align"
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    assert self_command("bin/gpu-align") == "gpu-align"  # the gpu-align on PATH is this one
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert self_command(str(exe)) == str(exe)  # outside the current folder: absolute
    assert self_command("/usr/lib/python3/site-packages/pytest") == "gpu-align"
    assert self_command("/x/gpu_align/__main__.py").endswith(" -m gpu_align")


def test_printed_command_runs_as_printed():
    """What the demo prints after `scripts/demo.sh` (started as .venv/bin/gpu-align in the repo) runs verbatim."""
    me = REPO / ".venv" / "bin" / "gpu-align"
    if not me.is_file():
        pytest.skip("no .venv/bin/gpu-align (set up with scripts/setup_env.sh)")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # not activated
    line = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c",
         "from gpu_align.commands.demo import self_command; print(self_command('.venv/bin/gpu-align'))"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert line == ".venv/bin/gpu-align"
    done = subprocess.run(f"{line} verify --help", shell=True, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "verify" in done.stdout
