"""packer.channel on its own: a real spawned packer process with a real DatasetWriter, no aligner, no torch.

Each test drives the typed protocol end to end: Ready → Batch → End gives a dataset and a Done reply; Abort gives
Aborted with what a resume keeps; a writer that cannot open, or a bug in the packer, becomes a typed error reply
(a UserError here); a killed packer becomes PackerDied. No sleeps: every wait is on the packer's reply or its exit.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from packer.channel import Aborted, Done, PackerClient, PackerDied, WriterSettings
from packer.errors import UserError
from packer.layout import STATE_NAME
from packer.process import CropBatch, ItemMeta

S = 16  # crop side: small, any size packs


def _batch(start: int, n: int, group: str = "id0", missing: tuple[int, ...] = ()) -> CropBatch:
    """``n`` consecutive inputs from ``start`` of one identity; those in ``missing`` produced no crop."""
    rng = np.random.default_rng(start)
    metas, rows = [], 0
    for i in range(start, start + n):
        if i in missing:
            metas.append(ItemMeta(i, group, f"{group}/{i}.jpg", skip_reason="no face: test"))
        else:
            metas.append(ItemMeta(i, group, f"{group}/{i}.jpg", row=rows, crop_name=f"{i}.jpg"))
            rows += 1
    return CropBatch(metas, rng.integers(0, 256, (rows, S, S, 3), dtype=np.uint8))


def _client(out: Path, **writer: object) -> PackerClient:
    settings = WriterSettings(out_dir=str(out), image_size=S, **writer)  # type: ignore[arg-type]
    return PackerClient(settings, quality=90, save_crops=None, threads=1, queue_batches=2)


def test_batches_then_end_give_a_dataset_and_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = _client(out, config={"test": 1})
    assert client.ready() == 0
    waited = client.send(_batch(0, 3, "a", missing=(1,)))
    assert waited >= 0.0
    client.send(_batch(3, 2, "b"))
    done = client.finish({"run": {"note": "from the test"}})
    assert isinstance(done, Done)
    assert client.proc.exitcode == 0
    # the reply's report is the report.json on disk, not a copy of it read back by the caller
    assert done.report == json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert done.report["counts"]["images"] == 4 and done.report["counts"]["classes"] == 2
    assert done.report["counts"]["skipped"] == 1
    assert done.report["extra"]["run"] == {"note": "from the test"}
    assert set(done.report["extra"]["packer"]) >= {"encode_s", "write_s", "wait_s", "peak_rss_mb"}
    assert done.report["config"]["input"] == {"test": 1}
    assert done.stats["crops"] == 4
    assert done.stats["summary"]["num_images"] == 4 and done.stats["summary"]["out_dir"] == str(out)
    for name in ("train.rec", "train.idx", "train.lst", "property"):
        assert (out / name).is_file(), name
    assert not (out / STATE_NAME).exists()


def test_abort_gives_aborted_and_a_resumable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = _client(out)
    assert client.ready() == 0
    client.send(_batch(0, 2, "a"))
    reply = client.abort()
    assert isinstance(reply, Aborted) and reply.done >= 0
    assert not client.proc.is_alive()
    assert (out / STATE_NAME).is_file() and not (out / "report.json").exists()
    # a resume opens it and skips exactly what the Aborted reply said is kept
    again = _client(out, resume=True)
    assert again.ready() == reply.done
    again.send(_batch(reply.done, 2 - reply.done, "a"))
    assert again.finish({}).report["counts"]["images"] == 2


def test_a_writer_that_cannot_open_gives_an_error_reply(tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    client = _client(out)
    with pytest.raises(UserError) as e:
        client.ready()
    assert not isinstance(e.value, PackerDied)
    assert "--resume" not in str(e.value)  # opening failed: nothing to resume
    client.proc.join(timeout=30)
    assert client.proc.exitcode == 0  # it replied and ended cleanly


def test_a_bug_in_the_packer_gives_an_error_reply_and_keeps_the_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = _client(out)
    assert client.ready() == 0
    bad = CropBatch([ItemMeta(0, "a", "a/0.jpg", row=5)], np.zeros((1, S, S, 3), np.uint8))  # no row 5
    client.send(bad)
    with pytest.raises(UserError) as e:
        client.finish({})
    assert not isinstance(e.value, PackerDied)
    assert "packer process failed: IndexError" in str(e.value) and "rerun with --resume" in str(e.value)
    client.proc.join(timeout=30)
    assert (out / STATE_NAME).is_file()


def test_a_killed_packer_is_packer_died(tmp_path: Path) -> None:
    client = _client(tmp_path / "out")
    assert client.ready() == 0
    os.kill(client.proc.pid, signal.SIGKILL)
    client.proc.join(timeout=30)
    with pytest.raises(PackerDied, match=r"the packer process died \(killed by signal 9\)"):
        client.check()
    with pytest.raises(PackerDied):
        client.finish({})
