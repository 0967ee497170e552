"""``gpu-align run --ray`` on a real local Ray runtime (CPU): the merged bytes equal ``--shard i/n`` runs + ``merge``,
a killed worker's shard is retried from its resume state, a shard that keeps failing stops the job naming it, a
stopped job continues with ``--resume``, a bad photo of one shard is in the merged report, and without Ray ``--ray``
says how to install it.

One Ray runtime for the module (2 CPUs; workers reserve fractions of a CPU so that 2 shared cores never deadlock),
shut down at the end. Kills and stops happen at a known point: the worker of the chosen shard holds once its writer
has committed part of it (``RayOptions.hold``) and the test acts when the driver's status shows it held.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from gpu_align.demo.data import build_demo_dataset
from gpu_align.pipeline import RunOptions, run
from gpu_align.scale import RayOptions
from gpu_align.scale.plan import PLAN_NAME, SHARDS_DIR, shard_dir, shard_sources
from gpu_align.scan import Source, scan_source
from packer.errors import UserError
from packer.layout import STATE_NAME
from packer.merge import merge_datasets

ray = pytest.importorskip("ray")

OUTPUTS = ("train.rec", "train.idx", "train.lst", "property", "train.rec.crc")
SHARDS = 3
BAD = "n000005/zz_truncated.jpg"  # in shard 1 of 3


def _opts(src: Path, out: Path, **kw) -> RunOptions:
    return RunOptions(src=str(src), out=str(out), device="cpu", decoder="cpu", batch_size=2, quiet=True, **kw)


def _ray_opts(**kw) -> RayOptions:
    return RayOptions(**{"shards": SHARDS, "workers": 2, "worker_cpus": 0.25, **kw})


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for every test here (~5 s to start)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """9 identities, 23 face photos, plus one truncated JPEG in identity n000005 (shard 1 of 3)."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    build_demo_dataset(root, identities=9, images_per_identity=3, seed=5)
    good = next((root / "n000005").iterdir()).read_bytes()
    (root / BAD).write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    """The sequential path: ``run --shard i/3`` for each i, then ``merge`` (what --ray must equal byte for byte)."""
    base = tmp_path_factory.mktemp("ref")
    dirs = []
    for i in range(SHARDS):
        d = base / f"s{i}"
        run(_opts(photos, d, shard=(i, SHARDS)))
        dirs.append(str(d))
    merge_datasets(dirs, base / "merged")
    return base / "merged"


def _same(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_shards_are_scan_source_shards(photos):
    """The driver's one scan, cut: every shard equals what ``scan_source(shard=(i, n))`` scans on its own."""
    full = scan_source(photos)
    for n in (1, 2, 3, 4, 9):
        for i, part in enumerate(shard_sources(full, n)):
            if not part.items:  # one identity holds more than 1/n of the photos: --shard i/n has nothing either
                with pytest.raises(UserError, match="no images to align in this shard"):
                    scan_source(photos, shard=(i, n))
                continue
            assert part.items == scan_source(photos, shard=(i, n)).items, (i, n)
            assert part.skipped == full.skipped


def test_equals_sequential_shards_and_merge(ray_runtime, photos, reference, tmp_path):
    """2 workers, 3 shards: the merged files equal the sequential shards + merge; one report holds the bad photo
    of shard 1, each shard, each worker's throughput."""
    from gpu_align.scale import run_ray

    out = tmp_path / "out"
    res = run_ray(_opts(photos, out), _ray_opts(keep_shards=True))
    _same(reference, out)
    assert res.shards == SHARDS and res.retries == 0 and res.inputs == 24
    report = _report(out)
    bad = [e for e in report["skipped"] if e["path"].endswith(BAD)]
    assert len(bad) == 1 and bad[0]["reason"].startswith("truncated"), report["skipped"]
    assert report["counts"]["inputs"] == 24 and report["counts"]["skipped"] == len(report["skipped"])
    info = report["extra"]["ray"]
    assert [s["shard"] for s in info["shards"]] == [0, 1, 2]
    assert {s["worker"] for s in info["shards"]} <= {w["worker"] for w in info["workers"]}
    assert sum(w["processed"] for w in info["workers"]) == 24
    assert all(w["images_per_second"] for w in info["workers"] if w["shards"])
    assert (out / "report.html").is_file()
    assert (out / SHARDS_DIR / PLAN_NAME).is_file()  # kept: --keep-shards


def test_killed_worker_is_retried_and_repeated_failure_stops_the_job(ray_runtime, photos, reference, tmp_path):
    """kill -9 of the worker holding shard 0 (after its writer committed part of it): with --retries 0 the job stops
    naming shard 0; ``--resume`` (killed once more) retries it on a new worker from its resume state: same bytes."""
    from gpu_align.scale import run_ray
    from gpu_align.scale.driver import ShardFailed

    out = tmp_path / "out"
    killed: list[int] = []

    def kill_held(status: dict) -> None:
        st = status["shards"].get(0)
        if st and st.get("held") and st["pid"] not in killed:
            killed.append(st["pid"])
            os.kill(st["pid"], signal.SIGKILL)

    with pytest.raises(ShardFailed, match=r"shard 0 of 3 \(.*shards/0\) failed: worker w\d \(pid \d+.*\) died"):
        run_ray(_opts(photos, out), _ray_opts(retries=0, hold=(0, 1)), on_status=kill_held)
    assert len(killed) == 1
    state = json.loads((shard_dir(out, 0, SHARDS) / STATE_NAME).read_text())
    assert state["done"] > 0  # part of shard 0 is committed

    res = run_ray(_opts(photos, out, resume=True), _ray_opts(hold=(0, 1)), on_status=kill_held)
    assert len(killed) == 2 and res.retries == 1
    _same(reference, out)
    info = _report(out)["extra"]["ray"]
    shard0 = info["shards"][0]
    assert shard0["attempts"] == 2 and shard0["resumed_at"] > 0, shard0
    assert info["retries"][0]["shard"] == 0 and "died" in info["retries"][0]["error"]
    assert not (out / SHARDS_DIR).exists()  # removed after the merge (no --keep-shards)


def test_stopped_job_resumes(ray_runtime, photos, reference, tmp_path):
    """The driver stopped (what Ctrl-C does) while shard 1 is held mid-way: every running shard stops cleanly and
    keeps its commits; a rerun without --resume, or with other settings or shard count, is refused; ``--resume``
    finishes with the same bytes; a second ``--resume`` has nothing to do."""
    from gpu_align.scale import run_ray

    class Stop(Exception):
        pass

    def stop_when_held(status: dict) -> None:
        if (status["shards"].get(1) or {}).get("held"):
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        run_ray(_opts(photos, out), _ray_opts(hold=(1, 1)), on_status=stop_when_held)
    assert json.loads((shard_dir(out, 1, SHARDS) / STATE_NAME).read_text())["done"] > 0
    assert not (out / "train.rec").exists()
    with pytest.raises(UserError, match="holds an unfinished Ray run: add --resume"):
        run_ray(_opts(photos, out), _ray_opts())
    with pytest.raises(UserError, match=r"other settings \(quality: 95 then, 90 now\)"):
        run_ray(_opts(photos, out, resume=True, quality=90), _ray_opts())
    with pytest.raises(UserError, match="was started with --shards 3"):
        run_ray(_opts(photos, out, resume=True), _ray_opts(shards=2))
    res = run_ray(_opts(photos, out, resume=True), _ray_opts())
    _same(reference, out)
    assert res.retries == 0
    assert _report(out)["extra"]["ray"]["shards"][1]["resumed_at"] > 0
    again = run_ray(_opts(photos, out, resume=True), _ray_opts())
    assert again.already_finished and again.images == res.images


def test_archive_with_landmarks_csv(ray_runtime, tmp_path):
    """A ``.tar.gz`` source with ``--landmarks-csv`` (written from a plain detection run of the same archive) under
    Ray with 2 shards: the plain run's train.rec/.idx/property, byte for byte (warping with the CSV's landmarks
    does not depend on batches, so the shards + merge equal the unsharded run); the CSV match is reported."""
    from gpu_align.csvmeta import write_vggface2_csvs
    from gpu_align.demo.vggface2 import write_vggface2_archive
    from gpu_align.scale import run_ray

    folder = tmp_path / "x" / "train"
    build_demo_dataset(folder, identities=4, images_per_identity=2, seed=8)
    archive = tmp_path / "vggface2_train.tar.gz"
    write_vggface2_archive(folder, archive, seed=1)
    plain = tmp_path / "plain"
    assert run(_opts(archive, plain)).found >= 6
    lm = tmp_path / "loose_landmark_train.csv"
    write_vggface2_csvs(plain / "train.lst", tmp_path / "loose_bb_train.csv", lm)
    out = tmp_path / "out"
    res = run_ray(_opts(archive, out, landmarks_csv=str(lm)), _ray_opts(shards=2))
    assert res.shards == 2 and res.inputs == 8
    for name in ("train.rec", "train.idx", "property"):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert all("::" in row.split("\t")[1] for row in (out / "train.lst").read_text().splitlines())
    (csv,) = _report(out)["extra"]["run"]["csv"]
    assert csv["kind"] == "landmarks" and csv["matched"] == csv["rows"] == res.report["counts"]["images"], csv


def test_cli_ray_flag_in_process(ray_runtime, photos, reference, tmp_path, capsys, monkeypatch):
    """``gpu-align run SRC --out DIR --ray --shards 3`` joins the runtime this process holds: same bytes, a summary.

    ``DIR`` (relative: the shards get absolute paths, which workers on other nodes need) holds an interrupted
    plain run: ``--ray --resume`` refuses it up front (its merge could never resume that pack), ``--ray
    --overwrite`` replaces it (once, the merge resumed the plain run's state and failed after aligning it all)."""
    from gpu_align.cli import run as cli

    def stop(*_):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    out = Path("out")
    with pytest.raises(KeyboardInterrupt):
        run(_opts(photos, out), progress=stop)
    assert (out / STATE_NAME).is_file()
    args = ["run", str(photos), "--out", "out", "--device", "cpu", "--decoder", "cpu", "--batch-size", "2"]
    assert cli([*args, "--ray", "--shards", "3", "--workers", "1", "-q", "--resume"]) == 2
    assert "holds an unfinished `gpu-align run` without --ray" in capsys.readouterr().err
    assert not (out / SHARDS_DIR).exists()
    assert cli([*args, "--ray", "--shards", "3", "--workers", "1", "-q", "--overwrite"]) == 0
    _same(reference, out)
    assert "3 shards on 1 workers" in capsys.readouterr().out
    assert not (out / "run.inputs.jsonl.gz").exists()  # the plain run's resume sidecar went with it
    report = _report(out)
    assert all(Path(i["rec"]).is_absolute() for i in report["config"]["input"]["inputs"]), report["config"]
    assert [s["dir"] for s in report["extra"]["ray"]["shards"]] == [f"{SHARDS_DIR}/{i}" for i in range(SHARDS)]
    assert cli([*args, "--ray", "--shard", "0/2"]) == 2
    assert "--shard and --ray exclude each other" in capsys.readouterr().err


def test_without_ray_the_flag_says_how_to_install(photos, tmp_path):
    """Ray made unimportable: one error line with the install command, exit 2, nothing written."""
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from gpu_align.cli import run\n"
        f"sys.exit(run(['run', {str(photos)!r}, '--out', {str(out)!r}, '--ray']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "gpu-align[ray]"' in lines[0], proc.stderr
    assert not out.exists()


def test_shard_count_is_clamped_before_the_resume_check():
    """``--shards 12`` over 9 identities plans 9 shards; the printed continue command (the same ``--shards 12``
    plus ``--resume``) is accepted, another count is refused."""
    from gpu_align.scale.plan import plan_shards

    assert plan_shards(12, 24, 9, None, "out") == 9
    assert plan_shards(12, 24, 9, 9, "out") == 9
    assert plan_shards(None, 24, 9, 9, "out") == 9
    with pytest.raises(UserError, match="was started with --shards 9"):
        plan_shards(4, 24, 9, 9, "out")


class _FakeRay:
    """What :class:`_Scheduler` asks of Ray when one call finishes: ``get`` of its result."""

    class exceptions:
        RayActorError = type("RayActorError", (Exception,), {})
        RayError = type("RayError", (Exception,), {})

    def __init__(self, result):
        self.result = result

    def get(self, ref):
        return self.result


def test_a_shard_that_stopped_on_its_own_is_retried_not_merged():
    """A worker that answers ``stopped`` without the driver's stop (a SIGINT in the worker): the shard is retried
    (counted), never recorded as finished, so the merge never takes its committed part for the whole."""
    from gpu_align.scale.driver import ShardFailed, _Attempt, _Scheduler, _Worker
    from gpu_align.scale.worker import ShardSpec

    sched = object.__new__(_Scheduler)
    spec = ShardSpec(0, 3, _opts(Path("src"), Path("out/shards/0")), Source("folder", "src"))
    w = _Worker("w0", None, {"pid": 1})
    sched.ray, sched.results, sched.retries, sched.max_retries = _FakeRay({"shard": 0, "stopped": True}), {}, [], 1
    sched.pending, sched.failures, sched.inflight = deque(), {0: 0}, {"ref": _Attempt(spec, w, 0.0)}
    sched._finished("ref")
    assert sched.results == {} and [s.attempt for s in sched.pending] == [1]
    assert "stopped before its end" in sched.retries[0]["error"]
    sched.inflight["ref"] = _Attempt(sched.pending.popleft(), w, 0.0)
    with pytest.raises(ShardFailed, match=r"failed after 2 attempts: the shard stopped.*rerun with --resume"):
        sched._finished("ref")


def test_a_shard_folder_still_locked_is_a_retryable_error(tmp_path, monkeypatch):
    """The previous attempt's packer still holds the shard folder's lock past the wait: an error the driver
    retries (``user_error`` False), not the writer's "being written by another process" that stops the job."""
    from gpu_align.scale import worker
    from packer.writer.folder import FolderLock

    monkeypatch.setattr(worker, "_LOCK_WAIT_S", 0.2)
    out = tmp_path / "shard"
    lock = FolderLock(out)
    try:
        spec = worker.ShardSpec(0, 1, _opts(tmp_path, out), Source("folder", str(tmp_path)))
        res = worker.ShardWorker(None, False).run_shard(spec)
    finally:
        lock.release()
    assert res["user_error"] is False and "still locked 0.2 s" in res["error"], res
    assert worker._wait_for_folder(out, timeout=0)
