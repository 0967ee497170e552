"""packer.layout.DatasetWriter: both layouts, both label styles, min_images, shuffle, crash-safe resume.

Everything is read back from disk with packer.recordio (the mxnet-compatible reader).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from packer import recordio
from packer.errors import UserError
from packer.layout import STATE_NAME, DatasetWriter, PackItem
from packer.lst import LstEntry


@pytest.fixture(scope="module")
def crops(load_photo) -> list[bytes]:
    """12 distinct real 112×112 JPEG crops of shipped face photos."""
    out = []
    for name in ("astronaut", "t1"):
        img = load_photo(name)
        h, w = img.shape[:2]
        for i in range(6):
            y, x = (h - 160) * i // 6, (w - 160) * (5 - i) // 6
            ok, buf = cv2.imencode(".jpg", cv2.resize(img[y : y + 160, x : x + 160], (112, 112))[..., ::-1])
            assert ok
            out.append(buf.tobytes())
    assert len(set(out)) == 12
    return out


# numpy.random.RandomState(seed).permutation(12), written out: the legacy RandomState stream is frozen, so a seed
# must give this order on any numpy (README: "--shuffle SEED"). Position j holds input record ORDER[j].
SHUFFLED_12 = {7: [7, 10, 2, 5, 0, 1, 11, 8, 3, 6, 9, 4], 11: [6, 3, 8, 10, 2, 11, 4, 5, 7, 1, 0, 9]}


def _items(crops, sizes=(3, 1, 2), skip=(("b", 0),)):
    """Inputs grouped by identity 'a', 'b', ...; ``skip`` adds (group, position) inputs with no image."""
    items, k = [], 0
    for g, n in zip("abcdefgh", sizes, strict=False):
        for j in range(n):
            if (g, j) in skip:
                items.append(PackItem(g, None, None, f"/src/{g}/miss{j}.jpg", "no face: nothing detected"))
            items.append(PackItem(g, crops[k], LstEntry(1, f"/src/{g}/{j}.jpg", 99), f"/src/{g}/{j}.jpg"))
            k += 1
    return items


def _write(out, items, **kw) -> object:
    with DatasetWriter(out, **kw) as w:
        for it in items[w.done :]:
            w.add(it)
        return w.close()


def _read(d):
    r = recordio.MXIndexedRecordIO(str(d / "train.idx"), str(d / "train.rec"), "r")
    recs = {k: recordio.unpack(r.read_idx(k)) for k in r.keys}
    keys = list(r.keys)
    offsets = dict(r.idx)
    r.close()
    return keys, recs, offsets


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _assert_idx_matches_file(d, offsets, keys):
    with open(d / "train.rec", "rb") as f:
        scanned = [off for off, _ in recordio.scan_records(f)]
    assert scanned == [offsets[k] for k in keys]  # idx offsets are the records' real positions, in file order


@pytest.mark.parametrize("style", ["scalar", "pair"])
def test_insightface_layout_keys_labels_meta_records(tmp_path, crops, style):
    items = _items(crops)
    s = _write(tmp_path / "out", items, label_style=style)
    d = tmp_path / "out"
    names = ["property", "report.json", "train.idx", "train.lst", "train.rec", "train.rec.crc"]
    assert sorted(p.name for p in d.iterdir()) == names
    keys, recs, offsets = _read(d)
    n, k = 6, 3
    assert keys == [1, 2, 3, 4, 5, 6, 0, 7, 8, 9]  # face2rec2 order: images, header, identities
    _assert_idx_matches_file(d, offsets, keys)
    classes = [0, 0, 0, 1, 2, 2]
    for key, cls, body in zip(range(1, n + 1), classes, crops[:6], strict=True):
        h, b = recs[key]
        assert (h.id, h.id2) == (key, 0) and b == body
        if style == "scalar":
            assert h.flag == 0 and h.label == cls
        else:
            assert h.flag == 2 and list(h.label) == [cls, 1.0]
    h0, b0 = recs[0]
    assert (h0.flag, list(h0.label), h0.id, b0) == (2, [n + 1, n + 1 + k], 0, b"")
    ranges = [list(recs[key][0].label) for key in range(n + 1, n + 1 + k)]
    assert ranges == [[1, 4], [4, 5], [5, 7]]
    assert all(recs[key][0].id == key and recs[key][1] == b"" for key in range(n + 1, n + 1 + k))
    assert (d / "property").read_text() == "3,112,112\n"
    lst = (d / "train.lst").read_text().splitlines()
    assert lst[0] == "1\t/src/a/0.jpg\t0" and lst[3] == "1\t/src/b/0.jpg\t1" and len(lst) == n
    report = json.loads((d / "report.json").read_text())
    assert report["counts"] == {"inputs": 7, "images": 6, "classes": 3, "skipped": 1, "dropped_identities": 0}
    assert report["skipped"] == [{"path": "/src/b/miss0.jpg", "reason": "no face: nothing detected", "identity": "b"}]
    assert report["skipped_by_reason"] == {"no face": 1}
    assert (s.num_images, s.num_classes, s.num_skipped, s.layout, s.label_style) == (6, 3, 1, "insightface", style)


def test_flat_layout_has_only_image_records(tmp_path, crops):
    d = tmp_path / "flat"
    _write(d, _items(crops), layout="flat")
    keys, recs, offsets = _read(d)
    assert keys == [0, 1, 2, 3, 4, 5]
    _assert_idx_matches_file(d, offsets, keys)
    assert [(recs[k][0].flag, recs[k][0].label, recs[k][0].id) for k in keys] == [
        (0, c, k) for k, c in zip(keys, [0, 0, 0, 1, 2, 2], strict=True)
    ]
    assert [recs[k][1] for k in keys] == crops[:6]
    assert (d / "property").read_text() == "3,112,112\n"


def test_shuffle_is_deterministic_and_a_permutation(tmp_path, crops):
    items = _items(crops, sizes=(4, 4, 4), skip=())
    for name, seed in (("s1", 7), ("s1b", 7), ("s2", 8)):
        _write(tmp_path / name, items, layout="flat", shuffle_seed=seed)
    assert _files(tmp_path / "s1") == _files(tmp_path / "s1b")
    k1, r1, off1 = _read(tmp_path / "s1")
    k2, r2, _ = _read(tmp_path / "s2")
    assert k1 == k2 == list(range(12))
    _assert_idx_matches_file(tmp_path / "s1", off1, k1)
    order1 = [crops.index(r1[k][1]) for k in k1]
    order2 = [crops.index(r2[k][1]) for k in k2]
    assert order1 == SHUFFLED_12[7] and order1 != order2
    assert sorted(order1) == sorted(order2) == list(range(12))  # a permutation: every image once
    for k in k1:  # labels travel with their images; header id = new key
        h, body = r1[k]
        assert h.id == k and h.label == crops.index(body) // 4
    lst = (tmp_path / "s1" / "train.lst").read_text().splitlines()
    assert [line.split("\t")[1] for line in lst] == [items[i].source for i in order1]


def test_min_images_drops_identities_and_keeps_labels_contiguous(tmp_path, crops):
    items = _items(crops, sizes=(3, 1, 2, 2), skip=(("c", 0),))
    d = tmp_path / "o"
    s = _write(d, items, min_images=2)
    _, recs, _ = _read(d)
    # a: 3 images, b: 1 (dropped), c: 2 (one input missing, 2 images kept), d: 2
    assert [recs[k][0].label for k in range(1, 8)] == [0, 0, 0, 1, 1, 2, 2]
    assert list(recs[0][0].label) == [8, 11]
    report = json.loads((d / "report.json").read_text())
    assert report["counts"]["dropped_identities"] == 1 and s.dropped_identities == 1
    assert report["skipped_by_reason"] == {"no face": 1, "too few images": 1}
    assert (d / "property").read_text().startswith("3,")


def test_identity_appearing_again_is_an_error(tmp_path, crops):
    with DatasetWriter(tmp_path / "o") as w:
        w.add(PackItem("a", crops[0]))
        w.add(PackItem("b", crops[1]))
        with pytest.raises(UserError, match="identity 'a' appears again"):
            w.add(PackItem("a", crops[2]))
        w.abort()


def test_one_writer_per_folder(tmp_path, crops):
    """A second writer (another process, or this one) on a folder being written is refused, not interleaved."""
    d = tmp_path / "o"
    w = DatasetWriter(d)
    w.add(PackItem("a", crops[0]))
    w.add(PackItem("b", crops[1]))  # identity "a" is finished: kept by abort()
    with pytest.raises(UserError, match="being written by another gpu-align process"):
        DatasetWriter(d, resume=True)
    w.abort()  # releases the folder
    with DatasetWriter(d, resume=True) as again:
        assert again.done == 1


def test_refuses_non_empty_dir_and_finished_dir(tmp_path, crops):
    d = tmp_path / "o"
    d.mkdir()
    (d / "mine.txt").write_text("keep me")
    for resume in (False, True):  # nothing to resume there: the advice never says --resume
        with pytest.raises(UserError, match=r"is not empty and holds no pack to resume \(mine.txt\); choose ") as e:
            DatasetWriter(d, resume=resume)
        assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)
    _write(d, _items(crops), overwrite=True)  # --overwrite leaves other files alone
    assert (d / "mine.txt").read_text() == "keep me"
    with pytest.raises(UserError, match=r"already holds a finished dataset \(6 images\)"):
        DatasetWriter(d)
    # resume of a finished dataset with the same settings: nothing to do
    before = _files(d)
    s = _write(d, _items(crops), resume=True)
    assert s.already_finished and s.num_images == 6 and _files(d) == before


def test_unfinished_pack_needs_resume_and_same_settings(tmp_path, crops):
    d = tmp_path / "o"
    w = DatasetWriter(d, config={"lst_sha256": "abc"})
    for it in _items(crops)[:5]:
        w.add(it)
    w.abort()
    with pytest.raises(UserError, match=r"holds an unfinished pack \(3 inputs written\): add --resume"):
        DatasetWriter(d)
    with pytest.raises(UserError, match=r"other settings or inputs \(label_style: 'scalar' then, 'pair' now\)"):
        DatasetWriter(d, resume=True, label_style="pair", config={"lst_sha256": "abc"})
    with pytest.raises(UserError, match=r"lst_sha256: 'abc' then, 'xyz' now"):
        DatasetWriter(d, resume=True, config={"lst_sha256": "xyz"})


@pytest.mark.parametrize("kw", [{}, {"layout": "flat", "shuffle_seed": 3}])
def test_abort_and_resume_is_byte_identical_even_with_torn_tails(tmp_path, crops, kw):
    items = _items(crops, sizes=(3, 1, 2, 2, 4), skip=(("b", 0), ("e", 2)))
    _write(tmp_path / "ref", items, **kw)
    d = tmp_path / "o"
    for stop in (2, 6, 9):  # abort mid-identity three times, each time resuming from `done`
        with DatasetWriter(d, resume=True, **kw) as w:
            for it in items[w.done : stop]:
                w.add(it)
            w.abort()
        state = json.loads((d / STATE_NAME).read_text())
        assert w.done == state["done"]  # what a resume keeps
        for name in ("train.rec", "train.idx", "train.lst", "train.rec.crc"):  # a crash after the commit: torn bytes
            with open(d / f"{name}.partial", "ab") as f:
                f.write(b"\x0a\x23\xd7\xce torn")
    assert state["done"] == 7  # identities a (3), b (1 + a miss), c (2) finished; d was not
    s = _write(d, items, resume=True, **kw)
    assert s.resumed_from == 7
    assert _files(d) == _files(tmp_path / "ref")


def test_resume_after_a_kill_before_the_first_commit_starts_afresh(tmp_path, crops):
    d = tmp_path / "o"
    d.mkdir()
    (d / "train.rec.partial").write_bytes(b"\x0a\x23\xd7\xce")  # no state file yet: nothing was committed
    (d / f"{STATE_NAME}.tmp").write_bytes(b"{")
    with pytest.raises(UserError, match="is not empty"):
        DatasetWriter(d)
    _write(d, _items(crops), resume=True)
    _write(tmp_path / "ref", _items(crops))
    assert _files(d) == _files(tmp_path / "ref")


def test_magic_word_inside_an_image_is_split_and_read_back(tmp_path, crops):
    magic = struct.pack("<I", recordio.MAGIC)
    # header (24 bytes) + body: put the magic at 4-byte-aligned payload offsets 24+8 and 24+40
    body = bytearray(crops[0])
    body[8:12] = magic
    body[40:44] = magic
    body = bytes(body)
    d = tmp_path / "o"
    _write(d, [PackItem("a", body), PackItem("a", crops[1])], layout="flat", shuffle_seed=1)
    raw = (d / "train.rec").read_bytes()
    assert raw.count(magic) == 2 + 2  # two records + two extra parts, the payload's own magic words not stored
    keys, recs, _ = _read(d)
    assert sorted(recs[k][1] for k in keys) == sorted([body, crops[1]])


def test_no_lst_report_extra_and_image_size(tmp_path, crops):
    d = tmp_path / "o"
    with DatasetWriter(d, write_lst=False, image_size=(112, 96)) as w:
        for it in _items(crops):
            w.add(it)
        w.close(report_extra={"detector": "mtcnn"})
    assert not (d / "train.lst").exists()
    report = json.loads((d / "report.json").read_text())
    assert report["extra"] == {"detector": "mtcnn"} and "train.lst" not in report["files"]
    assert (d / "property").read_text() == "3,112,96\n"


def test_invalid_combinations_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="flat layout stores scalar labels"):
        DatasetWriter(tmp_path / "a", layout="flat", label_style="pair")
    with pytest.raises(UserError, match="--shuffle needs --layout flat"):
        DatasetWriter(tmp_path / "b", shuffle_seed=1)
    with pytest.raises(UserError, match="min_images must be at least 1"):
        DatasetWriter(tmp_path / "c", min_images=0)
    assert not any(tmp_path.iterdir())  # nothing created


def test_empty_dataset_is_valid(tmp_path):
    d = tmp_path / "o"
    s = _write(d, [PackItem("a", None, source="/x.jpg", skip_reason="missing file")])
    keys, recs, _ = _read(d)
    assert keys == [0] and list(recs[0][0].label) == [1, 1]
    assert s.num_images == 0 and (d / "property").read_text() == "0,112,112\n"


@pytest.mark.parametrize("layout", ["insightface", "flat"])
def test_image_bytes_are_stored_unchanged(tmp_path, crops, layout):
    d = tmp_path / "o"
    items = _items(crops)
    _write(d, items, layout=layout)
    _, recs, _ = _read(d)
    first = 1 if layout == "insightface" else 0
    given = [it.body for it in items if it.body is not None]
    # byte for byte, in input order: no re-encode, no padding or header bytes in the body
    assert [recs[first + i][1] for i in range(len(given))] == given


@pytest.mark.dali
def test_dali_mxnet_reader_reads_the_flat_layout(tmp_path, crops):
    """The flat layout exists for DALI: every record is a sample with one scalar label (CPU pipeline)."""
    dali = pytest.importorskip("nvidia.dali")
    fn = pytest.importorskip("nvidia.dali.fn")
    items = _items(crops, sizes=(4, 4, 4), skip=())
    d = tmp_path / "flat"
    _write(d, items, layout="flat", shuffle_seed=11)

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.mxnet(path=[str(d / "train.rec")], index_path=[str(d / "train.idx")])
        return fn.decoders.image(jpegs, device="cpu"), labels, jpegs

    p = pipe()
    p.build()
    seen = []
    for _ in range(3):
        imgs, labels, raw = p.run()
        for i in range(4):
            assert imgs.at(i).shape == (112, 112, 3)
            seen.append((bytes(np.asarray(raw.at(i))), np.asarray(labels.at(i)).tolist()))
    assert seen == [(crops[i], [float(i // 4)]) for i in SHUFFLED_12[11]]  # file order, one float label each


def _open_fds_under(d) -> list[str]:
    """Paths under ``d`` that this process holds open (Linux /proc)."""
    fds = Path("/proc/self/fd")
    out = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(d)):
                out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_refused_resume_leaves_no_partial_file_open(tmp_path, crops):
    """A resume refused part-way (a partial file missing) closed the partials it had reopened only at garbage
    collection: while the error was kept (a traceback, a retry loop), the files stayed open."""
    d = tmp_path / "o"
    w = DatasetWriter(d, commit_interval=0)
    for it in _items(crops)[:5]:
        w.add(it)
    w.abort()
    (d / "train.lst.partial").unlink()
    with pytest.raises(UserError, match=r"train\.lst\.partial is missing") as e:
        DatasetWriter(d, resume=True)
    assert e.value is not None and _open_fds_under(d) == []


def test_a_failed_finish_in_a_with_block_keeps_the_pack_resumable(tmp_path, crops):
    """``with DatasetWriter(...)`` whose close() fails at the end (here ``property.partial`` cannot be replaced)
    aborts: the folder is released, so the same process can resume it to the uninterrupted pack's bytes."""
    items = _items(crops)
    _write(tmp_path / "ref", items)
    d = tmp_path / "o"
    blocker = d / "property.partial"
    with pytest.raises(OSError), DatasetWriter(d) as w:  # the failure is the with block's exit
        for it in items:
            w.add(it)
        blocker.mkdir()
        (blocker / "x").write_text("a folder where the writer puts a file")
    (blocker / "x").unlink()
    blocker.rmdir()
    s = _write(d, items, resume=True)  # before the fix: "being written by another gpu-align process"
    assert s.num_images == 6 and _files(d) == _files(tmp_path / "ref")
