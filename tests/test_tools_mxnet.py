"""The real mxnet 1.9.1 (its own venv, see mxnet_env.py) reads what merge, to-flat and reindex --repair write,
exactly as InsightFace's training code does (key 0 header, then keys 1..N; flat: every key)."""

from __future__ import annotations

import mxnet_env
import pytest
import tools_fixtures as tf

from packer.cli import run
from packer.reader import DatasetReader

pytestmark = pytest.mark.mxnet


def test_mxnet_reads_merged_flat_and_repaired_datasets(mxnet_python, tmp_path, ids):
    tf.write_face2rec2(tmp_path / "a", ids[:2], "pair")
    tf.write_released(tmp_path / "b", ids[2:])
    q = ["-q"]
    assert run(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "merged"), *q]) == 0
    assert run(["to-flat", str(tmp_path / "merged"), "--out", str(tmp_path / "flat"), "--shuffle", "1", *q]) == 0
    tf.write_flat(tmp_path / "rep", ids)
    rec = tmp_path / "rep" / "train.rec"
    offsets = dict(tf.idx_entries(tmp_path / "rep" / "train.idx"))
    data = bytearray(rec.read_bytes())
    data[offsets[4] : offsets[4] + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data[:-6]))  # a damaged record inside and a truncated tail
    assert run(["reindex", str(rec), "--repair", *q]) == 0

    names = ("merged", "flat", "rep")
    jobs = [
        {
            "op": "insightface_read",
            "rec": str(tmp_path / n / "train.rec"),
            "idx": str(tmp_path / n / "train.idx"),
            "out_blob": str(tmp_path / f"{n}.blob"),
        }
        for n in names
    ]
    for name, res in zip(names, mxnet_env.run_jobs(mxnet_python, jobs, tmp_path), strict=True):
        with DatasetReader(tmp_path / name) as r:
            want = [(rec_.key, float(rec_.label), rec_.body) for rec_ in r]
        got_keys = [(it["key"], it["label"]) for it in res["items"]]
        assert got_keys == [(k, lab) for k, lab, _ in want], name
        lengths = [it["body_length"] for it in res["items"]]
        blob = (tmp_path / f"{name}.blob").read_bytes()
        bodies, pos = [], 0
        for n in lengths:
            bodies.append(blob[pos : pos + n])
            pos += n
        assert bodies == [b for _, _, b in want], name
    assert len(want) == 12  # rep: 14 records minus the damaged one and the cut last one
