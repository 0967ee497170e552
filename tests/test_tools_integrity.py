"""Integrity of the dataset tools: tools refuse what verify rejects, .idx lines mxnet rejects, repair ends in a
usable insightface layout, the train.rec.crc sidecar, and the small reliability fixes (issue 8, items 3, 4, 7, 8, 10).
Real files on disk; the real mxnet 1.9.1 judges where it matters."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import mxnet_env
import numpy as np
import pytest
import tools_fixtures as tf

from packer import recordio
from packer.cli import run
from packer.errors import UserError
from packer.layout import STATE_NAME, DatasetWriter, PackItem
from packer.reader import DatasetReader
from packer.reindex import reindex
from packer.verify import validate_index, verify_dataset

N, K = tf.N, tf.K


def _write_idx(d, entries) -> None:
    (d / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in sorted(entries.items(), key=lambda e: e[1])))


# ------------------------------------------------------------------------------ item 3: tools refuse bad indexes

_BAD_INDEX = {
    "swapped": lambda e: {**e, 2: e[5], 5: e[2]},  # key 2 (class 0) and key 5 (class 1) swap records
    "two-keys-one-record": lambda e: {**e, 3: e[4]},
    "empty-idx": lambda e: {},
    "keys-missing": lambda e: {k: v for k, v in e.items() if k not in (4, 6)},
}


@pytest.mark.parametrize("case", list(_BAD_INDEX))
def test_tools_refuse_what_verify_rejects(tmp_path, ids, case, capsys):
    ds = tmp_path / "ds"
    tf.write_face2rec2(ds, ids, "scalar")
    _write_idx(ds, _BAD_INDEX[case](dict(tf.idx_entries(ds / "train.idx"))))
    assert not verify_dataset(ds).ok
    cheap = validate_index(ds)
    assert not cheap.ok and set(cheap.counts) <= set(verify_dataset(ds).counts)  # the same rules, same verdict
    capsys.readouterr()
    for cmd in (["merge", str(ds)], ["to-flat", str(ds)], ["unpack", str(ds)]):
        out = tmp_path / f"out-{cmd[0]}"
        assert run([*cmd, "--out", str(out), "-q"]) == 2, cmd
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("gpu-align: error: ")
        assert "does not match train.rec" in err and "reindex" in err and "--repair" in err and "--force" in err
        assert not out.exists() or not any(out.iterdir())
    # --force: the tool reads the index as it is (and says so); a key that is not there still cannot be read
    forced = run(["unpack", str(ds), "--out", str(tmp_path / "forced"), "-q", "--force"])
    err = capsys.readouterr().err
    assert "--force: reading it anyway" in err
    assert forced == 0 if case != "keys-missing" else (forced == 2 and "key 4 is not in the index" in err)
    # the advised repair makes the tools work again, with the original labels
    assert run(["reindex", str(ds), "--repair", "-q"]) == 0
    assert verify_dataset(ds).ok
    assert run(["to-flat", str(ds), "--out", str(tmp_path / "flat"), "-q"]) == 0
    with DatasetReader(tmp_path / "flat") as r:
        assert sorted(np.bincount(r.labels()).tolist()) == sorted(tf.COUNTS)


def test_swapped_offsets_would_have_changed_a_face_s_class(tmp_path, ids):
    # what --force lets through is what the index says: key 2's record (class 0's face) lands in class 1
    ds = tmp_path / "ds"
    tf.write_face2rec2(ds, ids, "scalar")
    _write_idx(ds, _BAD_INDEX["swapped"](dict(tf.idx_entries(ds / "train.idx"))))
    summary, notes = __import__("packer.merge", fromlist=["x"]).merge_datasets([ds], tmp_path / "m", force=True)
    assert summary.num_images == N and any("label-mismatch" in n for n in notes)


# ------------------------------------------------------------------------------ item 4: what mxnet's reader accepts

_MX_OPEN = """
import json, sys
from mxnet import recordio
out = []
for idx, rec in json.loads(sys.argv[1]):
    try:
        r = recordio.MXIndexedRecordIO(idx, rec, "r")
        out.append(["ok", len(r.keys)])
    except Exception as e:
        out.append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


def _mxnet_open(python, pairs) -> list:
    proc = subprocess.run(
        [str(python), "-c", _MX_OPEN, json.dumps([[str(i), str(r)] for i, r in pairs])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.mxnet
def test_idx_lines_mxnet_rejects_are_verify_errors_and_reindex_cleans_them(mxnet_python, tmp_path, ids):
    lines = {}
    for case in ("clean", "blank", "trailing-blank", "spaces"):
        d = tmp_path / case
        tf.write_flat(d, ids)
        text = (d / "train.idx").read_text().splitlines(keepends=True)
        if case == "blank":
            text.insert(3, "\n")
        elif case == "trailing-blank":
            text.append("\n")
        elif case == "spaces":
            text[5] = text[5].replace("\t", " ")
        (d / "train.idx").write_text("".join(text))
        lines[case] = d
    verdicts = _mxnet_open(mxnet_python, [(d / "train.idx", d / "train.rec") for d in lines.values()])
    for (case, d), (verdict, _) in zip(lines.items(), verdicts, strict=True):
        rep = verify_dataset(d, decode=False)
        assert (verdict == "ok") == rep.ok == (case == "clean"), (case, verdict, rep.counts)
        if case != "clean":
            assert verdict == "ValueError" and rep.counts == {"index-line": 1}
            where = {"blank": 4, "trailing-blank": N + 1, "spaces": 6}[case]
            assert rep.problems[0].message.startswith(f"train.idx:{where}: ")
            assert ("blank line" if "blank" in case else "not separated by a tab") in rep.problems[0].message
            with DatasetReader(d) as r:  # our own reader is lenient: every key is still there
                assert r.keys == list(range(N))
            assert run(["reindex", str(d), "-q"]) == 0
            assert verify_dataset(d, decode=False).ok
    verdicts = _mxnet_open(mxnet_python, [(d / "train.idx", d / "train.rec") for d in lines.values()])
    assert verdicts == [["ok", N]] * 4


# ------------------------------------------------------------------------------ item 7: repair rebuilds the layout


def _damage(ds, case: str) -> dict[int, int]:
    """Damage ``ds`` (face2rec2 or released order); returns the surviving image key -> old label."""
    rec = ds / "train.rec"
    e = dict(tf.idx_entries(ds / "train.idx"))
    raw = bytearray(rec.read_bytes())
    labels = {k: c for c, (s, t) in enumerate([(1, 4), (4, 9), (9, 11), (11, 15)]) for k in range(s, t)}
    if case == "cut-in-identity-records":  # face2rec2: images, key 0, then identity records: cut in those
        rec.write_bytes(bytes(raw[: e[N + 2] + 10]))
        return labels
    if case == "cut-in-images":  # face2rec2: half-way through class 1 (keys 7.. lost, classes 2, 3 vanish)
        rec.write_bytes(bytes(raw[: e[7] + 30]))
        return {k: c for k, c in labels.items() if k < 7}
    if case in ("inner-class-gone", "released-inner-class-gone"):  # both images of class 2 (keys 9, 10) broken
        for k in (9, 10):
            raw[e[k] : e[k] + 4] = b"\0\0\0\0"
        rec.write_bytes(bytes(raw))
        return {k: c for k, c in labels.items() if k not in (9, 10)}
    raise AssertionError(case)


_REPAIR_CASES = ["cut-in-identity-records", "cut-in-images", "inner-class-gone", "released-inner-class-gone"]


@pytest.mark.parametrize("case", _REPAIR_CASES)
def test_repair_ends_in_a_usable_insightface_layout(tmp_path, ids, case, capsys):
    ds = tmp_path / "ds"
    write = tf.write_released if case.startswith("released") else tf.write_face2rec2
    images = write(ds, ids)
    survivors = _damage(ds, case)
    assert run(["reindex", str(ds), "--repair", "-q"]) == 0
    out = capsys.readouterr().out
    n = len(survivors)
    old_classes = sorted(set(survivors.values()))
    assert f"rebuilt the insightface layout: {n} images (keys 1..{n}), {len(old_classes)} identities" in out
    if "class-gone" in case:
        assert "image keys lost: 9, 10" in out and "classes with no image left: 2" in out
    rep = verify_dataset(ds)
    assert rep.ok, rep.problems
    assert rep.layout == "insightface" and rep.num_images == n and rep.num_classes == len(old_classes)
    assert (ds / "property").read_text() == f"{len(old_classes)},112,112\n"
    # every surviving image keeps its bytes and its class, renumbered contiguously, in the old key order
    relabel = {c: i for i, c in enumerate(old_classes)}
    with DatasetReader(ds) as r:
        got = [(x.label, x.body) for x in r]
    assert got == [(relabel[survivors[k]], images[k][1]) for k in sorted(survivors)]
    for cmd in (["inspect", str(ds)], ["unpack", str(ds), "--out", str(tmp_path / "u")]):
        assert run([*cmd, "-q"] if cmd[0] == "unpack" else cmd) == 0, cmd
    assert run(["merge", str(ds), "--out", str(tmp_path / "m"), "-q"]) == 0
    assert run(["to-flat", str(ds), "--out", str(tmp_path / "f"), "-q"]) == 0
    assert verify_dataset(tmp_path / "m").ok and verify_dataset(tmp_path / "f").ok


@pytest.mark.mxnet
def test_mxnet_reads_repaired_insightface_layouts(mxnet_python, tmp_path, ids):
    jobs, want = [], []
    for case in _REPAIR_CASES:
        ds = tmp_path / case
        (tf.write_released if case.startswith("released") else tf.write_face2rec2)(ds, ids)
        _damage(ds, case)
        reindex(ds, repair=True)
        jobs.append(
            {
                "op": "insightface_read",
                "rec": str(ds / "train.rec"),
                "idx": str(ds / "train.idx"),
                "out_blob": str(tmp_path / f"{case}.blob"),
            }
        )
        with DatasetReader(ds) as r:
            want.append([(x.key, float(x.label), len(x.body)) for x in r])
    for case, res, w in zip(_REPAIR_CASES, mxnet_env.run_jobs(mxnet_python, jobs, tmp_path), want, strict=True):
        assert [(it["key"], it["label"], it["body_length"]) for it in res["items"]] == w, case
        assert len(w) > 0


# ------------------------------------------------------------------------------ item 8: the checksum sidecar


def _writer_dataset(d, ids, **kw) -> None:
    with DatasetWriter(d, **kw) as w:
        for name, bodies in ids:
            for b in bodies:
                w.add(PackItem(group=name, body=b, source=f"{name}/x.jpg"))


def _verify_ok(d) -> bool:
    try:
        return verify_dataset(d, decode=False, workers=1).ok
    except UserError:  # "not a RecordIO file" (the first magic flipped): verify exits 2
        return False


def test_sidecar_catches_every_single_byte_flip(tmp_path, ids):
    d = tmp_path / "ds"
    _writer_dataset(d, ids[:2])
    assert verify_dataset(d).ok
    raw = (d / "train.rec").read_bytes()
    positions = sorted(set(range(0, len(raw), max(1, len(raw) // 400))) | set(range(0, 64)) | {len(raw) - 1})
    missed_without = 0
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        (d / "train.rec").write_bytes(bytes(bad))
        assert not _verify_ok(d), pos
    crc = (d / "train.rec.crc").read_bytes()
    (d / "train.rec.crc").unlink()  # without it verify is as before: many flips go unseen
    for pos in positions[::10]:
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        (d / "train.rec").write_bytes(bytes(bad))
        missed_without += _verify_ok(d)
    assert missed_without > 0
    (d / "train.rec").write_bytes(raw)
    (d / "train.rec.crc").write_bytes(crc)
    assert verify_dataset(d).ok


def test_every_writer_writes_a_matching_sidecar(tmp_path, ids):
    _writer_dataset(tmp_path / "w", ids)
    _writer_dataset(tmp_path / "s", ids, layout="flat", shuffle_seed=3)
    tf.write_face2rec2(tmp_path / "f2r", ids)
    assert run(["merge", str(tmp_path / "w"), str(tmp_path / "f2r"), "--out", str(tmp_path / "m"), "-q"]) == 0
    assert run(["to-flat", str(tmp_path / "m"), "--out", str(tmp_path / "t"), "--shuffle", "1", "-q"]) == 0
    assert not (tmp_path / "f2r" / "train.rec.crc").exists()
    assert run(["reindex", str(tmp_path / "f2r"), "-q"]) == 0  # reindex adds one to a dataset without
    for name in ("w", "s", "m", "t", "f2r"):
        d = tmp_path / name
        assert (d / "train.rec.crc").is_file(), name
        rep = verify_dataset(d, decode=False)
        assert rep.ok, (name, rep.problems)
        # and it is really checked: one flipped bit in the middle of the .rec
        raw = bytearray((d / "train.rec").read_bytes())
        raw[len(raw) // 2] ^= 1
        (d / "train.rec").write_bytes(bytes(raw))
        assert verify_dataset(d, decode=False).counts.get("checksum") == 1, name


def test_reindex_keeps_a_sidecar_that_disagrees_and_repair_drops_the_changed_record(tmp_path, ids, capsys):
    d = tmp_path / "ds"
    _writer_dataset(d, ids)
    e = dict(tf.idx_entries(d / "train.idx"))
    raw = bytearray((d / "train.rec").read_bytes())
    raw[e[6] + 200] ^= 0xFF  # inside key 6's JPEG: still parses, still decodes as JPEG bytes
    (d / "train.rec").write_bytes(bytes(raw))
    sidecar = (d / "train.rec.crc").read_bytes()
    assert run(["reindex", str(d), "-q"]) == 0
    assert "1 records differ from their checksums in train.rec.crc" in capsys.readouterr().out
    assert (d / "train.rec.crc").read_bytes() == sidecar
    rep = verify_dataset(d, decode=False)
    assert rep.counts["checksum"] == 1 and [p.key for p in rep.problems if p.kind == "checksum"] == [6]
    assert run(["reindex", str(d), "--repair", "-q"]) == 0
    out = capsys.readouterr().out
    assert "image keys lost: 6" in out
    rep = verify_dataset(d)
    assert rep.ok and rep.num_images == N - 1


def test_resume_of_a_pack_begun_before_checksums_is_byte_identical(tmp_path, ids):
    _writer_dataset(tmp_path / "ref", ids)
    d = tmp_path / "old"
    items = [PackItem(group=name, body=b, source=f"{name}/x.jpg") for name, bodies in ids for b in bodies]
    w = DatasetWriter(d)
    for it in items[:9]:
        w.add(it)
    w.abort()
    # make it look like an older gpu-align's pack: no sidecar stream in the state or on disk
    state = json.loads((d / STATE_NAME).read_text())
    del state["sizes"]["crc"]
    (d / STATE_NAME).write_text(json.dumps(state))
    (d / "train.rec.crc.partial").unlink()
    with DatasetWriter(d, resume=True) as w:
        assert w.done == 8
        for it in items[w.done :]:
            w.add(it)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()
    }


# ------------------------------------------------------------------------------ item 10: the smaller ones


@pytest.mark.mxnet
def test_pack_of_labels_beyond_float32_matches_mxnet(mxnet_python, tmp_path):
    labels = [1e39, -1e39, 3.4028235677973366e38, 3.40282356e38, 1e300]
    script = (
        "import json, sys\nfrom mxnet import recordio\n"
        "print(json.dumps([recordio.pack(recordio.IRHeader(0, x, 7, 0), b'ab').hex() for x in json.loads(sys.argv[1])]"
        " + [recordio.pack(recordio.IRHeader(0, [1e39, 2.0], 7, 0), b'ab').hex()]))"
    )
    proc = subprocess.run([str(mxnet_python), "-c", script, json.dumps(labels)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [recordio.pack(recordio.IRHeader(0, x, 7, 0), b"ab").hex() for x in labels]
    ours.append(recordio.pack(recordio.IRHeader(0, [1e39, 2.0], 7, 0), b"ab").hex())
    assert ours == theirs
    assert recordio.unpack(bytes.fromhex(ours[0]))[0].label == float("inf")
    assert struct.unpack_from("<f", bytes.fromhex(ours[3]), 4)[0] == np.finfo(np.float32).max


def test_unpack_names_are_zero_padded_and_lst_pack_keeps_labels(tmp_path, capsys):
    many = tf.identities((1,) * 11 + (2,))  # 12 classes: labels 0..11, so "10" < "2" as plain strings
    tf.write_face2rec2(tmp_path / "ds", many, "scalar")
    assert run(["unpack", str(tmp_path / "ds"), "--out", str(tmp_path / "imgs"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [f"{i:02d}" for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "imgs" / "11").iterdir()) == ["12.jpg", "13.jpg"]
    capsys.readouterr()
    assert run(["lst", str(tmp_path / "imgs"), "-o", str(tmp_path / "re.lst")]) == 0
    with DatasetReader(tmp_path / "ds") as r:
        want = [(x.label, x.body) for x in r]
    got = []
    for line in (tmp_path / "re.lst").read_text().splitlines():
        _, path, label = line.split("\t")[:3]
        got.append((int(label), (tmp_path / path).read_bytes()))  # absolute, or relative to the .lst's folder
    assert got == want


def test_writer_refusals_say_resume_only_when_there_is_something_to_resume(tmp_path, ids):
    d = tmp_path / "f2r"
    tf.write_face2rec2(d, ids)  # a finished dataset that is not ours
    for resume in (False, True):
        with pytest.raises(UserError) as e:
            DatasetWriter(d, resume=resume)
        assert "holds a dataset" in str(e.value) and "--resume" not in str(e.value) and "--overwrite" in str(e.value)
    _writer_dataset(tmp_path / "ours", ids)
    with pytest.raises(UserError, match="already holds a finished dataset") as e:
        DatasetWriter(tmp_path / "ours")
    assert "--resume" not in str(e.value)
    shutil.rmtree(tmp_path / "ours")
