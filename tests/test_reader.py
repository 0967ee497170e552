"""DatasetReader on real datasets of every layout and label style, plus its error messages."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import tools_fixtures as tf

from packer.errors import UserError
from packer.reader import (
    DatasetReader,
    decode_image,
    image_ext,
    image_format,
    image_shape,
    read_index,
    resolve_dataset,
)
from packer.recordio import MAGIC, IRHeader

COUNTS = tf.COUNTS

EXPECT = {
    "pair": ("insightface", "pair"),
    "scalar": ("insightface", "scalar"),
    "released": ("insightface", "scalar"),
    "flat": ("flat", "scalar"),
    "flat-shuffled": ("flat", "scalar"),
}


@pytest.mark.parametrize("kind", list(EXPECT))
def test_reader_reads_every_layout(tmp_path, ids, kind):
    images = tf.write_kind(kind.removesuffix("-shuffled"), tmp_path / "ds", ids, 7 if "-shuffled" in kind else None)
    layout, style = EXPECT[kind]
    with DatasetReader(tmp_path / "ds") as r:
        assert r.layout == layout
        assert r.label_style == style
        assert r.num_images == sum(COUNTS)
        assert r.num_classes == len(COUNTS)
        assert r.image_keys() == sorted(images)
        assert [rec.key for rec in r] == sorted(images)
        for rec in r:
            assert (rec.label, rec.body) == images[rec.key]
            assert rec.header.id == rec.key
        labels = r.labels()
        assert labels.dtype == np.int64
        assert labels.tolist() == [images[k][0] for k in sorted(images)]
        if layout == "insightface":
            n = sum(COUNTS)
            assert r.header.flag == 2 and r.header.label.tolist() == [n + 1, n + 1 + len(COUNTS)]
            bounds = np.cumsum((1, *COUNTS)).tolist()
            assert r.identity_ranges() == list(itertools.pairwise(bounds))
            assert r.identity_keys() == list(range(n + 1, n + 1 + len(COUNTS)))
        else:
            assert r.header is None and r.identity_ranges() is None
        assert r.property is not None and (r.property.height, r.property.width) == (112, 112)


def test_reader_takes_rec_or_idx_path(tmp_path, ids):
    tf.write_released(tmp_path, ids)
    for p in (tmp_path / "train.rec", tmp_path / "train.idx"):
        with DatasetReader(p) as r:
            assert r.layout == "insightface" and r.num_images == sum(COUNTS)
    paths = resolve_dataset(tmp_path / "train.idx")
    assert paths.rec == tmp_path / "train.rec" and paths.dir == tmp_path


def test_read_header_handles_split_records(tmp_path, ids):
    # A body starting with the magic word at a 4-aligned payload offset makes the writer split the record:
    # read_header must fall back to the full read and agree with read().
    body = struct.pack("<I", MAGIC) + ids[0][1][0]
    recs = [(0, IRHeader(0, 5.0, 0, 0), body), (1, IRHeader(0, [3.0, 1.0], 1, 0), body)]
    tf.write_records(tmp_path, recs)
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(struct.pack("<I", MAGIC)) > 2  # really split
    with DatasetReader(tmp_path) as r:
        assert r.layout == "flat"
        assert r.read(0).body == body and r.read(1).body == body
        assert r.read_header(0).label == 5.0 and r.read_header(1).label.tolist() == [3.0, 1.0]
        assert r.labels().tolist() == [5, 3]
        assert r.label_style == "mixed"


def test_label_style_and_empty_dataset(tmp_path):
    tf.write_records(tmp_path, [])
    with DatasetReader(tmp_path) as r:
        assert r.num_images == 0 and r.label_style == "none" and r.layout == "flat" and r.num_classes == 0


def test_image_helpers(ids):
    jpg = ids[1][1][0]
    rgb = decode_image(jpg)
    assert rgb.shape == (112, 112, 3) and rgb.dtype == np.uint8
    png = tf.png(rgb)
    assert (image_format(jpg), image_ext(jpg)) == ("jpeg", ".jpg")
    assert (image_format(png), image_ext(png)) == ("png", ".png")
    assert image_ext(b"hello world") == ".bin"
    assert image_shape(jpg) == image_shape(png) == (112, 112)
    assert np.array_equal(decode_image(png), rgb)  # PNG is lossless and comes back RGB, not BGR
    with pytest.raises(ValueError, match="corrupt JPEG"):
        decode_image(jpg[: len(jpg) // 2])
    with pytest.raises(ValueError, match="not an image"):
        decode_image(b"\x00" * 100)


def test_reader_errors(tmp_path, ids):
    with pytest.raises(UserError, match="no such file or directory"):
        DatasetReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no train\.rec"):
        DatasetReader(tmp_path / "empty")

    ds = tmp_path / "ds"
    tf.write_flat(ds, ids)
    idx = (ds / "train.idx").read_bytes()
    (ds / "train.idx").unlink()
    with pytest.raises(UserError, match="index file missing; rebuild it with: gpu-align reindex"):
        DatasetReader(ds)

    (ds / "train.idx").write_bytes(idx + b"99\t12345678\n")
    with pytest.raises(UserError, match=r"key 99 points at byte 12345678, past the end"):
        DatasetReader(ds)
    (ds / "train.idx").write_bytes(idx + b"3\t0\n")
    with pytest.raises(UserError, match="key 3 appears more than once"):
        DatasetReader(ds)
    (ds / "train.idx").write_bytes(idx + b"oops\n")
    with pytest.raises(UserError, match=r"train.idx:15: expected 'key<TAB>offset'"):
        read_index(ds / "train.idx")
    with pytest.raises(UserError, match=r"train.idx:15: expected 'key<TAB>offset'"):
        DatasetReader(ds)  # the vectorised parser falls back to the line parser for the message
    (ds / "train.idx").write_bytes(b"\n" + idx.replace(b"\n", b"\n\n", 3))  # blank lines are fine
    with DatasetReader(ds) as r:
        assert r.keys == list(range(14))

    (ds / "train.idx").write_bytes(idx)
    (ds / "train.rec").write_bytes(b"PK\x03\x04 this is a zip file" + bytes(200))
    with pytest.raises(UserError, match="is not a RecordIO file"):
        DatasetReader(ds)
