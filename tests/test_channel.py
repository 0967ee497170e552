"""packer.channel on its own: a real spawned packer process with a real DatasetWriter, no aligner, no torch.

Each test drives the typed protocol end to end: Ready → Batch → End gives a dataset and a Done reply; Abort gives
Aborted with what a resume keeps; a writer that cannot open, or a bug in the packer, becomes a typed error reply
(a UserError here); a killed packer becomes PackerDied. No sleeps: every wait is on the packer's reply or its exit.
The crops are small cuts of a real shipped photo, and the dataset is read back from disk.

The last tests run :func:`packer.channel.packer_main` in this process on plain queues (no subprocess): the typed
messages that come back for each one sent.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpu_align.demo import photos
from packer.channel import (
    Abort,
    Aborted,
    Batch,
    Done,
    End,
    PackerClient,
    PackerDied,
    PackerError,
    Ready,
    WriterSettings,
    packer_main,
)
from packer.errors import UserError
from packer.layout import STATE_NAME
from packer.process import CropBatch, ItemMeta
from packer.reader import DatasetReader, decode_image

S = 16  # crop side: small, any size packs
_PHOTO = photos.load_rgb("astronaut")  # 512×512


def _crop(i: int) -> np.ndarray:
    """Input ``i``'s S×S crop: a different 128 px square of the astronaut photo for every i, shrunk."""
    y, x = 32 * (i % 12), 32 * ((i * 5) % 12)
    return cv2.resize(_PHOTO[y : y + 128, x : x + 128], (S, S), interpolation=cv2.INTER_AREA)


def _batch(start: int, n: int, group: str = "id0", missing: tuple[int, ...] = ()) -> CropBatch:
    """``n`` consecutive inputs from ``start`` of one identity; those in ``missing`` produced no crop."""
    metas, crops = [], []
    for i in range(start, start + n):
        if i in missing:
            metas.append(ItemMeta(i, group, f"{group}/{i}.jpg", skip_reason="no face: test"))
        else:
            metas.append(ItemMeta(i, group, f"{group}/{i}.jpg", row=len(crops), crop_name=f"{i}.jpg"))
            crops.append(_crop(i))
    return CropBatch(metas, np.stack(crops) if crops else np.zeros((0, S, S, 3), np.uint8))


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
    # on disk: the four crops in input order (0, 2 of "a"; 3, 4 of "b"), as JPEG q90 of what was sent
    assert (out / "property").read_text().split("\n")[0] == f"2,{S},{S}"
    with DatasetReader(out) as ds:
        records = list(ds)
        assert ds.num_images == 4 and ds.num_classes == 2 and ds.identity_ranges() == [(1, 3), (3, 5)]
    assert [r.label for r in records] == [0, 0, 1, 1]
    for r, i in zip(records, (0, 2, 3, 4), strict=True):
        stored = decode_image(r.body)
        assert stored.shape == (S, S, 3)
        assert np.abs(stored.astype(int) - _crop(i)).mean() < 6, i  # JPEG q90 of a 16×16 photo cut
        others = [np.abs(stored.astype(int) - _crop(j)).mean() for j in (0, 2, 3, 4) if j != i]
        assert min(others) > np.abs(stored.astype(int) - _crop(i)).mean()  # it is this input's crop


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


def test_sending_to_a_dead_packer_is_packer_died(tmp_path: Path) -> None:
    client = _client(tmp_path / "out")  # an inbox of two batches
    assert client.ready() == 0
    os.kill(client.proc.pid, signal.SIGKILL)
    client.proc.join(timeout=30)
    with pytest.raises(PackerDied, match="killed by signal 9"):
        for start in range(0, 30, 3):  # the inbox fills: the client notices the packer is gone
            client.send(_batch(start, 3))
    assert client.abort() is None  # nothing to ask any more (and the batches left in the inbox do not block exit)


# --- packer_main in this process: the typed messages ---------------------------------------------------------------


@pytest.fixture
def own_signals():
    """packer_main ignores SIGINT/SIGTERM/SIGHUP (the parent decides); give pytest its handlers back after."""
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    saved = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _run_packer(out: Path, messages: list, stop: threading.Event | None = None) -> list:
    """Run packer_main here on ``messages`` (queued up front); the messages it sent back, in order."""
    inbox, outbox = queue.Queue(), queue.Queue()
    for m in messages:
        inbox.put(m)
    settings = WriterSettings(out_dir=str(out), image_size=S)
    packer_main(inbox, outbox, settings, 90, None, 1, os.getppid(), stop)
    replies = []
    while not outbox.empty():
        replies.append(outbox.get_nowait())
    return replies


def test_packer_main_replies_ready_then_done(tmp_path: Path, own_signals) -> None:
    replies = _run_packer(tmp_path / "out", [Batch(_batch(0, 2, "a")), Batch(_batch(2, 1, "b")), End({"k": 1})])
    assert [type(r) for r in replies] == [Ready, Done]
    ready, done = replies
    assert ready == Ready(0)
    assert done.report["counts"]["images"] == 3 and done.report["extra"]["k"] == 1
    assert done.stats["crops"] == 3 and done.stats["summary"]["num_classes"] == 2
    # a second packer on the finished folder refuses to open it: an error reply instead of Ready
    (refused,) = _run_packer(tmp_path / "out", [End()])
    assert isinstance(refused, PackerError) and refused.message


def test_packer_main_abort_and_stop_reply_aborted(tmp_path: Path, own_signals) -> None:
    replies = _run_packer(tmp_path / "a", [Batch(_batch(0, 2, "a")), Abort(), End()])
    assert [type(r) for r in replies] == [Ready, Aborted]
    assert 0 <= replies[1].done <= 2 and (tmp_path / "a" / STATE_NAME).is_file()
    # the stop event: aborted at the next input although batches (and an End) are queued
    stop = threading.Event()
    stop.set()
    replies = _run_packer(tmp_path / "b", [Batch(_batch(0, 2, "a")), End()], stop)
    assert replies == [Ready(0), Aborted(0)]
    assert not (tmp_path / "b" / "report.json").exists()


def test_packer_main_rejects_an_untyped_message(tmp_path: Path, own_signals) -> None:
    inbox, outbox = queue.Queue(), queue.Queue()
    inbox.put("end")  # the old string protocol
    with pytest.raises(TypeError, match="packer protocol: unexpected message 'end'"):
        packer_main(
            inbox, outbox, WriterSettings(out_dir=str(tmp_path / "out"), image_size=S), 90, None, 1, os.getppid()
        )
    assert outbox.get_nowait() == Ready(0)
    err = outbox.get_nowait()
    assert isinstance(err, PackerError) and err.message.startswith("packer process failed: TypeError")
    assert (tmp_path / "out" / STATE_NAME).is_file()  # resumable
