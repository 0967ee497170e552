"""`gpu-align reindex`: byte-identical rebuilt indexes, key modes, and --repair of damaged .rec files."""

from __future__ import annotations

import pytest
import tools_fixtures as tf

from packer.cli import run
from packer.reader import DatasetReader
from packer.recordio import IRHeader
from packer.reindex import reindex
from packer.verify import verify_dataset

N, K = tf.N, tf.K


@pytest.mark.parametrize("kind", tf.KINDS)
def test_rebuilt_index_is_byte_identical(tmp_path, ids, kind, capsys):
    tf.write_kind(kind, tmp_path, ids)
    idx = tmp_path / "train.idx"
    original = idx.read_bytes()
    idx.unlink()
    assert run(["reindex", str(tmp_path / "train.rec"), "-q"]) == 0
    assert idx.read_bytes() == original
    assert "keys: header" in capsys.readouterr().out
    # the structural modes give the same keys where they apply
    mode = "sequential" if kind == "flat" else "layout"
    res = reindex(tmp_path / "train.rec", idx=tmp_path / "other.idx", keys=mode)
    assert res.keys == mode and (tmp_path / "other.idx").read_bytes() == original


def test_auto_falls_back_when_header_ids_are_not_keys(tmp_path, ids):
    # a writer that left header.id = 0 everywhere: auto must use the insightface layout, and flat -> sequential
    recs = [(k, h._replace(id=0), b) for k, h, b in tf.face2rec2_records(ids, "scalar")]
    tf.write_records(tmp_path / "a", recs, K)
    original = (tmp_path / "a" / "train.idx").read_bytes()
    res = reindex(tmp_path / "a", idx=tmp_path / "a" / "new.idx")
    assert res.keys == "layout" and (tmp_path / "a" / "new.idx").read_bytes() == original
    with pytest.raises(Exception, match="header ids are not unique"):
        reindex(tmp_path / "a", idx=tmp_path / "a" / "x.idx", keys="header")

    flat = [(i, IRHeader(0, float(i % 3), 0, 0), ids[0][1][i % 3]) for i in range(5)]
    tf.write_records(tmp_path / "b", flat)
    res = reindex(tmp_path / "b", idx=tmp_path / "b" / "new.idx")
    assert res.keys == "sequential"
    assert (tmp_path / "b" / "new.idx").read_bytes() == (tmp_path / "b" / "train.idx").read_bytes()


def test_damaged_rec_needs_repair(tmp_path, ids, capsys):
    tf.write_flat(tmp_path, ids)
    rec = tmp_path / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-3])
    before = (rec.read_bytes(), (tmp_path / "train.idx").read_bytes())
    assert run(["reindex", str(rec), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is damaged at bytes" in err and "a partial last record (header id 13" in err and "--repair" in err
    assert (rec.read_bytes(), (tmp_path / "train.idx").read_bytes()) == before  # nothing touched


def test_repair_truncated_rec(tmp_path, ids, capsys):
    images = tf.write_flat(tmp_path, ids)
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    entries = tf.idx_entries(idx)
    raw = rec.read_bytes()
    last = entries[-1][1]
    rec.write_bytes(raw[:-10])  # machine died while writing the last record
    assert run(["reindex", str(rec), "--repair", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"dropped bytes {last}..{len(raw) - 10} ({len(raw) - 10 - last} bytes): a partial last record" in out
    assert rec.read_bytes() == raw[:last]
    assert (tmp_path / f"train.rec.dropped-{last}").read_bytes() == raw[last:-10]
    assert tf.idx_entries(idx) == entries[:-1]
    assert "1 keys of the previous index have no record any more" in out
    rep = verify_dataset(tmp_path)
    assert rep.ok and rep.num_images == N - 1
    with DatasetReader(tmp_path) as r:
        assert all((rec_.label, rec_.body) == images[rec_.key] for rec_ in r)


def test_repair_face2rec2_cut_before_meta_records(tmp_path, ids, capsys):
    tf.write_face2rec2(tmp_path, ids)
    rec = tmp_path / "train.rec"
    cut = dict(tf.idx_entries(tmp_path / "train.idx"))[N] + 100  # inside the last image: no meta records yet
    rec.write_bytes(rec.read_bytes()[:cut])
    assert run(["reindex", str(tmp_path), "--repair", "-q"]) == 0
    out = capsys.readouterr().out
    assert "rebuilt the insightface layout: 13 images (keys 1..13), 4 identities" in out
    # the surviving images are a prefix of the file: cut after them, new meta records appended
    assert (tmp_path / f"train.rec.dropped-{cut - 100}").is_file()
    with DatasetReader(tmp_path) as r:
        assert r.layout == "insightface" and r.label_style == "pair" and r.image_keys() == list(range(1, N))
        assert r.identity_ranges() == [(1, 4), (4, 9), (9, 11), (11, 14)]
    assert verify_dataset(tmp_path).ok


def test_repair_damage_inside_the_file(tmp_path, ids, capsys):
    images = tf.write_flat(tmp_path, ids)
    rec = tmp_path / "train.rec"
    entries = dict(tf.idx_entries(tmp_path / "train.idx"))
    raw = rec.read_bytes()
    bad = bytearray(raw)
    bad[entries[6] : entries[6] + 4] = b"\0\0\0\0"  # record 6's magic overwritten
    rec.write_bytes(bytes(bad))
    assert run(["reindex", str(rec), "--repair", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"dropped bytes {entries[6]}..{entries[7]}" in out and "original is kept as train.rec.bak" in out
    assert (tmp_path / "train.rec.bak").read_bytes() == bytes(bad)
    assert rec.read_bytes() == raw[: entries[6]] + raw[entries[7] :]
    with DatasetReader(tmp_path) as r:
        assert r.image_keys() == [k for k in range(N) if k != 6]
        assert all((x.label, x.body) == images[x.key] for x in r)
    rep = verify_dataset(tmp_path)
    assert rep.ok and any("keys run 0..13, not 0..12" in w for w in rep.warnings)


def test_reindex_refuses_non_recordio(tmp_path, capsys):
    (tmp_path / "x.rec").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert run(["reindex", str(tmp_path / "x.rec")]) == 2
    assert "is not a RecordIO file" in capsys.readouterr().err
    assert not (tmp_path / "x.idx").exists()
