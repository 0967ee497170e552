"""`gpu-align merge` and `gpu-align to-flat`: renumbered keys/labels, whole identities, untouched bytes."""

from __future__ import annotations

import tools_fixtures as tf

from packer.cli import run
from packer.lst import read_lst
from packer.reader import DatasetReader
from packer.verify import verify_dataset


def _classes(ds) -> list[list[bytes]]:
    """Bodies per label, in key order."""
    with DatasetReader(ds) as r:
        out: dict[int, list[bytes]] = {}
        for rec in r:
            out.setdefault(rec.label, []).append(rec.body)
    assert sorted(out) == list(range(len(out)))
    return [out[c] for c in range(len(out))]


def test_merge_two_shards(tmp_path, ids, capsys):
    a, b = ids[:2], ids[2:]
    tf.write_face2rec2(tmp_path / "a", a, "pair")  # face2rec2 with train.lst
    tf.write_face2rec2(tmp_path / "b", b, "scalar")
    out = tmp_path / "m"
    assert run(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "-q"]) == 0
    assert "14 images, 4 identities (insightface layout, scalar labels)" in capsys.readouterr().out
    rep = verify_dataset(out)
    assert rep.ok and rep.layout == "insightface" and rep.label_style == "scalar"
    with DatasetReader(out) as r:
        assert r.image_keys() == list(range(1, 15))
        assert r.identity_ranges() == [(1, 4), (4, 9), (9, 11), (11, 15)]
    # shard a's classes 0, 1 then shard b's 0, 1 renumbered to 2, 3; bytes unchanged, order kept
    assert _classes(out) == [bodies for _, bodies in ids]
    lst = list(read_lst(out / "train.lst", require_grouped=False))
    assert [e.label for e in lst] == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 4
    assert lst[8].path == f"/data/{ids[2][0]}/000.jpg"  # first image of shard b, path kept


def test_merge_mixed_layouts_to_flat_pair_error_and_shuffle(tmp_path, ids, capsys):
    tf.write_released(tmp_path / "a", ids[:2])
    tf.write_flat(tmp_path / "b", ids[2:], shuffle_seed=5)
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "b")]
    assert run([*args, "--out", str(tmp_path / "m"), "--layout", "flat", "--label-style", "pair"]) == 2
    assert "flat layout stores scalar labels" in capsys.readouterr().err
    assert run([*args, "--out", str(tmp_path / "m"), "--label-style", "pair", "-q"]) == 0
    assert "no train.lst written" in capsys.readouterr().err
    assert verify_dataset(tmp_path / "m").label_style == "pair"
    got = _classes(tmp_path / "m")
    assert [sorted(x) for x in got] == [sorted(bodies) for _, bodies in ids]  # flat shard: grouped by label
    assert not (tmp_path / "m" / "train.lst").exists()

    assert run([*args, "--out", str(tmp_path / "f"), "--layout", "flat", "--shuffle", "3", "-q"]) == 0
    rep = verify_dataset(tmp_path / "f")
    assert rep.ok and rep.layout == "flat" and rep.num_images == 14 and rep.num_classes == 4


def test_merge_by_name_joins_identities(tmp_path, ids):
    more = tf.identities((3, 6))  # tom_hanks_0, astronaut_1 again, other crops
    shard_a = [ids[1], ids[0]]  # astronaut_1, tom_hanks_0
    shard_b = [(more[1][0], more[1][1][3:]), ids[2]]  # astronaut_1 (3 other crops), camera_2
    tf.write_face2rec2(tmp_path / "a", shard_a)
    tf.write_face2rec2(tmp_path / "b", shard_b)
    out = tmp_path / "m"
    assert run(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--by-name", "-q"]) == 0
    assert verify_dataset(out).ok
    # identities sorted by name: astronaut_1 (a's 5 + b's 3), camera_2, tom_hanks_0
    assert _classes(out) == [ids[1][1] + more[1][1][3:], ids[2][1], ids[0][1]]
    lst = list(read_lst(out / "train.lst", require_grouped=False))
    assert [e.path.split("/")[2] for e in lst[:8]] == ["astronaut_1"] * 8 and lst[7].label == 0
    # default: same names stay distinct identities
    assert run(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "d"), "-q"]) == 0
    assert len(_classes(tmp_path / "d")) == 4


def test_merge_resume_after_interrupt_is_identical(tmp_path, ids, monkeypatch):
    tf.write_face2rec2(tmp_path / "a", ids[:2])
    tf.write_face2rec2(tmp_path / "b", ids[2:])
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-q"]
    assert run([*args, "--out", str(tmp_path / "ref")]) == 0

    real_read = DatasetReader.read
    calls = {"n": 0}

    def read_then_interrupt(self, key):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the third identity
            raise KeyboardInterrupt
        return real_read(self, key)

    monkeypatch.setattr(DatasetReader, "read", read_then_interrupt)
    assert run([*args, "--out", str(tmp_path / "m")]) == 130
    monkeypatch.setattr(DatasetReader, "read", real_read)
    assert (tmp_path / "m" / "pack.state.json").exists() and not (tmp_path / "m" / "train.rec").exists()
    assert run([*args, "--out", str(tmp_path / "m")]) == 2  # needs --resume
    assert run([*args, "--out", str(tmp_path / "m"), "--resume"]) == 0
    for name in ("train.rec", "train.idx", "train.lst", "property"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_to_flat(tmp_path, ids, capsys):
    tf.write_face2rec2(tmp_path / "src", ids, "pair")
    assert run(["to-flat", str(tmp_path / "src"), "--out", str(tmp_path / "f"), "-q"]) == 0
    assert "14 images, 4 identities (flat layout, scalar labels)" in capsys.readouterr().out
    with DatasetReader(tmp_path / "f") as r:
        assert r.layout == "flat" and r.label_style == "scalar" and r.header is None
        assert r.keys == list(range(14))  # keys 0..N-1 in file order, no meta records
        recs = list(r)
    assert [x.label for x in recs] == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 4
    assert [x.body for x in recs] == [b for _, bodies in ids for b in bodies]
    assert verify_dataset(tmp_path / "f").ok

    for name, seed in (("s1", 7), ("s2", 7), ("s3", 8)):
        assert run(["to-flat", str(tmp_path / "src"), "--out", str(tmp_path / name), "--shuffle", str(seed), "-q"]) == 0
    rec = {n: (tmp_path / n / "train.rec").read_bytes() for n in ("s1", "s2", "s3")}
    assert rec["s1"] == rec["s2"] and rec["s1"] != rec["s3"]
    with DatasetReader(tmp_path / "s1") as r:
        shuffled = [(x.label, x.body) for x in r]
        assert r.keys == list(range(14))
    assert shuffled != [(x.label, x.body) for x in recs]
    assert sorted(shuffled) == sorted((x.label, x.body) for x in recs)  # same images, same labels
    lst = list(read_lst(tmp_path / "s1" / "train.lst", require_grouped=False))
    assert [e.label for e in lst] == [lab for lab, _ in shuffled]  # train.lst follows the shuffle
