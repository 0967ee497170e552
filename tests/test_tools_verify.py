"""`gpu-align verify`: clean datasets pass, and each kind of damage is reported precisely (key, offset)."""

from __future__ import annotations

import json
import struct

import pytest
import tools_fixtures as tf

from packer.cli import run
from packer.recordio import MAGIC, IRHeader
from packer.verify import verify_dataset

N, K = tf.N, tf.K


def _offsets(ds):
    return dict(tf.idx_entries(ds / "train.idx"))


@pytest.mark.parametrize("kind", tf.KINDS)
def test_clean_datasets_pass(tmp_path, ids, kind, capsys):
    tf.write_kind(kind, tmp_path, ids, shuffle_seed=1)
    assert run(["verify", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert ": OK" in out and "14 images, 4 identities" in out and "112x112 (14)" in out
    rep = verify_dataset(tmp_path)
    assert rep.ok and rep.layout == ("flat" if kind == "flat" else "insightface")
    assert rep.label_style == ("pair" if kind == "pair" else "scalar")
    assert rep.num_records == (N if kind == "flat" else N + 1 + K)


def test_truncated_rec(tmp_path, ids, capsys):
    tf.write_face2rec2(tmp_path, ids)
    rec = tmp_path / "train.rec"
    last = max(_offsets(tmp_path).values())
    rec.write_bytes(rec.read_bytes()[:-5])
    assert run(["verify", str(tmp_path), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"train.rec is truncated: the record at byte {last} is cut short" in out
    assert "reindex train.rec --repair" in out
    rep = verify_dataset(tmp_path)
    assert rep.counts["truncated"] == 1
    assert rep.problems[0].offset == last
    assert rep.counts["offset-damaged"] == 1  # the key of the cut record points into the damaged tail


def test_corrupt_magic_mid_file_resyncs(tmp_path, ids):
    tf.write_face2rec2(tmp_path, ids)
    rec = tmp_path / "train.rec"
    off = _offsets(tmp_path)[5]
    data = bytearray(rec.read_bytes())
    data[off : off + 4] = b"XXXX"
    rec.write_bytes(bytes(data))
    rep = verify_dataset(tmp_path)
    assert not rep.ok
    damaged = [p for p in rep.problems if p.kind == "damaged"]
    assert len(damaged) == 1 and damaged[0].offset == off
    assert f"bytes {off}..{_offsets(tmp_path)[6]}" in damaged[0].message  # exactly the one record
    assert rep.num_records == N + K  # every other record was found after the damage
    assert rep.counts == {"damaged": 1, "offset-damaged": 1}
    assert any(p.kind == "offset-damaged" and p.key == 5 for p in rep.problems)


def test_idx_offset_past_end(tmp_path, ids, capsys):
    tf.write_flat(tmp_path, ids)
    size = (tmp_path / "train.rec").stat().st_size
    with open(tmp_path / "train.idx", "a") as f:
        f.write(f"{N}\t{size + 400}\n")
    assert run(["verify", str(tmp_path), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"train.idx:{N + 1}: key {N} points at byte {size + 400}, past the end of train.rec ({size} bytes)" in out


def test_offset_not_a_record_and_unindexed(tmp_path, ids):
    tf.write_flat(tmp_path, ids)
    entries = tf.idx_entries(tmp_path / "train.idx")
    entries[3] = (3, entries[3][1] + 8)  # points into record 3
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries[:-1]))  # last record unindexed
    rep = verify_dataset(tmp_path)
    kinds = {p.kind: p for p in rep.problems}
    assert rep.counts == {"offset-not-record": 1, "unindexed": 2}
    assert kinds["offset-not-record"].key == 3 and f"inside the record at byte {entries[3][1] - 8}" in (
        kinds["offset-not-record"].message
    )
    unindexed = sorted(p.offset for p in rep.problems if p.kind == "unindexed")
    assert unindexed == [entries[3][1] - 8, entries[-1][1]]


def test_duplicate_keys(tmp_path, ids):
    tf.write_flat(tmp_path, ids)
    entries = tf.idx_entries(tmp_path / "train.idx")
    entries[4] = (2, entries[4][1])
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))
    rep = verify_dataset(tmp_path)
    assert rep.counts["duplicate-key"] == 1
    assert "key 2 is listed 2 times (lines 3, 5)" in rep.problems[0].message


def test_wrong_identity_range(tmp_path, ids):
    recs = tf.face2rec2_records(ids)
    # class 1 should be [4, 9); make it [4, 8): class 1 then ends before class 2 starts
    recs = [(k, IRHeader(0, [4.0, 8.0], k, 0), b"") if k == N + 2 else (k, h, b) for k, h, b in recs]
    tf.write_records(tmp_path, recs, K)
    rep = verify_dataset(tmp_path)
    assert rep.counts == {"identity-range": 1}
    p = rep.problems[0]
    assert p.key == N + 3 and "(class 2): range [9, 11) starts at 9, expected 8" in p.message


def test_label_mismatch(tmp_path, ids, capsys):
    recs = tf.face2rec2_records(ids, "scalar")
    recs = [(k, IRHeader(0, 3.0, k, 0), b) if k == 6 else (k, h, b) for k, h, b in recs]
    tf.write_records(tmp_path, recs, K)
    assert run(["verify", str(tmp_path), "-q"]) == 1
    out = capsys.readouterr().out
    assert "label-mismatch  image key 6 has label 3, but its key lies in the range of class 1 [4, 9)" in out
    assert "1  label-mismatch" in out


def test_undecodable_jpeg(tmp_path, ids):
    bad = [(name, list(bodies)) for name, bodies in ids]
    body = bad[2][1][1]
    bad[2][1][1] = body[: len(body) // 2]  # key 10: a JPEG cut in half
    tf.write_face2rec2(tmp_path, bad)
    rep = verify_dataset(tmp_path)
    assert rep.counts == {"decode": 1}
    assert rep.problems[0].key == 10 and "corrupt JPEG" in rep.problems[0].message
    # --no-decode reads headers only: the intact header hides the damage (the documented trade-off)
    assert verify_dataset(tmp_path, decode=False).ok


def test_image_size_property_and_label_style(tmp_path, ids):
    recs = tf.face2rec2_records(ids, "pair")
    small = tf.jpeg(tf.decode_rgb(ids[0][1][0])[:100, :100])
    recs = [(k, IRHeader(0, 1.0, k, 0), b) if k == 5 else (k, h, b) for k, h, b in recs]  # scalar among pairs
    recs = [(k, h, small) if k == 2 else (k, h, b) for k, h, b in recs]
    tf.write_records(tmp_path, recs, num_classes=5)
    rep = verify_dataset(tmp_path)
    assert rep.counts == {"image-size": 1, "property": 1, "label-style": 1}
    msgs = {p.kind: p.message for p in rep.problems}
    assert msgs["image-size"] == "image key 2 is 100x100, the property file says 112x112"
    assert msgs["property"] == "property says 5 classes, key 0 says 4 identities"
    assert "scalar labels: 1 (first key 5), with list labels: 13 (first key 1)" in msgs["label-style"]


def test_missing_identity_record_key_and_json(tmp_path, ids, capsys):
    tf.write_face2rec2(tmp_path, ids)
    entries = [e for e in tf.idx_entries(tmp_path / "train.idx") if e[0] != N + 2]
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))
    assert run(["verify", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"]["missing-key"] == 1 and data["counts"]["unindexed"] == 1
    assert any(p["kind"] == "missing-key" and p["key"] == N + 2 for p in data["problems"])


def test_max_problems_limits_detail_not_count(tmp_path, ids, capsys):
    recs = tf.face2rec2_records(ids, "scalar")
    recs = [(k, IRHeader(0, 3.0, k, 0), b) if 1 <= k <= 8 else (k, h, b) for k, h, b in recs]  # 8 wrong labels
    tf.write_records(tmp_path, recs, K)
    assert run(["verify", str(tmp_path), "-q", "--max-problems", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 8 problems" in out and "(first 3 shown)" in out
    assert out.count("label-mismatch  image key") == 3


def test_split_record_is_not_damage(tmp_path, ids):
    # a body with the magic at an aligned offset is stored as a multi-part record: it must verify clean
    # (a JPEG comment segment carries it: payload offset 24 + 8 labels + 2 SOI + 4 COM header + 2 = 40)
    jpg = ids[0][1][0]
    comment = b"xx" + struct.pack("<I", MAGIC) + b"yy"
    body = jpg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment + jpg[2:]
    recs = tf.face2rec2_records([("a", [body, ids[0][1][1]])], "pair")
    tf.write_records(tmp_path, recs, 1)
    assert (tmp_path / "train.rec").read_bytes().count(struct.pack("<I", MAGIC)) == 5  # 4 records, one split
    rep = verify_dataset(tmp_path)
    assert rep.ok and rep.num_records == 4


def test_not_recordio_is_a_user_error(tmp_path, capsys):
    (tmp_path / "train.rec").write_bytes(b"GIF89a" + bytes(100))
    (tmp_path / "train.idx").write_text("0\t0\n")
    assert run(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-align: error: ") and "is not a RecordIO file" in err and "Traceback" not in err


def test_header_id_beyond_int64_is_checked_not_a_crash(tmp_path, ids):
    """A damaged header ``id`` of 2**64 - 1 (an unsigned field; mxnet's keys are signed 64-bit) once stopped verify
    with an OverflowError: the check goes on, and a problem in a later record is still found."""
    recs = tf.face2rec2_records(ids, "scalar")
    recs = [
        (k, IRHeader(h.flag, h.label, 2**64 - 1, h.id2), b) if k == 5 else
        (k, IRHeader(0, 3.0, k, 0), b) if k == 6 else (k, h, b)
        for k, h, b in recs
    ]
    tf.write_records(tmp_path, recs, K)
    rep = verify_dataset(tmp_path)
    assert rep.counts.get("label-mismatch") == 1, rep.counts
    assert any(p.key == 6 for p in rep.problems)
