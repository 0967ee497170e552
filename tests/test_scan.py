"""The folder scan: packer.scan (dir2lst: sorted identities, contiguous labels, every skipped file reported with a
reason) and gpu_align.scan.scan_source (a run's inputs from a folder or a .lst: identities, min_images, shard, limit,
the .lst's own landmarks)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpu_align.scan import parse_shard, scan_source, shard_blocks
from packer.errors import UserError
from packer.lst import LstEntry
from packer.scan import scan_folder


@pytest.fixture(scope="module")
def jpeg(load_photo) -> bytes:
    """A real 112×112 face-photo crop as JPEG bytes."""
    img = load_photo("astronaut")[60:260, 150:350]
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (112, 112))[..., ::-1])
    assert ok
    return buf.tobytes()


def _tree(root, spec: dict[str, list[str]], data: bytes):
    for folder, files in spec.items():
        d = root / folder if folder else root
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            (d / f).write_bytes(data)


def test_identities_sorted_images_sorted_labels_contiguous(tmp_path, jpeg):
    root = tmp_path / "faces"
    _tree(
        root,
        {
            "zoe": ["b.JPG", "a.jpeg"],
            "Émile": ["1.png"],
            "adam": ["10.jpg", "2.jpg", "1.Jpg"],
            "bob": ["x.gif"],  # no usable image: no label
        },
        jpeg,
    )
    res = scan_folder(root)
    assert res.identities == ["adam", "zoe", "Émile"]  # str order, locale-independent
    names = [(os.path.relpath(e.path, root), e.label, e.aligned) for e in res.entries]
    assert names == [
        ("adam/1.Jpg", 0, 1),
        ("adam/10.jpg", 0, 1),
        ("adam/2.jpg", 0, 1),
        ("zoe/a.jpeg", 1, 1),
        ("zoe/b.JPG", 1, 1),
        ("Émile/1.png", 2, 1),
    ]
    assert all(os.path.isabs(e.path) for e in res.entries)
    assert dict(res.skipped) == {
        str(root / "bob" / "x.gif"): "not an image (.gif; looking for .jpg, .jpeg, .png)",
        str(root / "bob"): "no images in this identity folder",
    }


def test_relative_paths_and_aligned_flag(tmp_path, jpeg):
    _tree(tmp_path, {"a": ["1.jpg"], "b": ["1.jpg", "2.jpg"]}, jpeg)
    res = scan_folder(tmp_path, absolute=False, aligned=0)
    assert res.entries == [LstEntry(0, "a/1.jpg", 0), LstEntry(0, "b/1.jpg", 1), LstEntry(0, "b/2.jpg", 1)]


def test_skipped_files_have_reasons(tmp_path, jpeg):
    _tree(tmp_path, {"": ["stray.jpg", ".DS_Store"], "a": ["1.jpg", ".hidden.jpg", "notes.txt", "README"]}, jpeg)
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a" / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "a" / "tab\tname.jpg").write_bytes(jpeg)
    res = scan_folder(tmp_path, absolute=False)
    assert [e.path for e in res.entries] == ["a/1.jpg"]
    assert dict(res.skipped) == {
        ".DS_Store": "hidden",
        ".git": "hidden",
        "stray.jpg": "not inside an identity folder",
        "a/.hidden.jpg": "hidden",
        "a/README": "not an image (no extension; looking for .jpg, .jpeg, .png)",
        "a/dangling.jpg": "unreadable: broken link (its target does not exist)",
        "a/nested": "folder inside an identity folder (not scanned)",
        "a/notes.txt": "not an image (.txt; looking for .jpg, .jpeg, .png)",
        "a/tab\tname.jpg": "path contains a tab/newline (a tab-separated .lst line cannot hold it)",
    }


def test_min_images_drops_small_identities_and_keeps_labels_contiguous(tmp_path, jpeg):
    _tree(tmp_path, {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg"], "c": ["1.jpg", "2.jpg", "3.jpg"]}, jpeg)
    res = scan_folder(tmp_path, min_images=2, absolute=False)
    assert res.identities == ["a", "c"]
    assert [(e.path, e.label) for e in res.entries] == [("a/1.jpg", 0), ("a/2.jpg", 0)] + [
        (f"c/{i}.jpg", 1) for i in (1, 2, 3)
    ]
    assert res.skipped == [("b", "fewer than min_images=2 images (identity has 1)")]


def test_custom_extensions(tmp_path, jpeg):
    _tree(tmp_path, {"a": ["1.jpg", "2.webp"]}, jpeg)
    assert [e.path for e in scan_folder(tmp_path, exts=["webp"], absolute=False).entries] == ["a/2.webp"]


def test_missing_root_and_file_root_are_user_errors(tmp_path, jpeg):
    with pytest.raises(UserError, match="no such folder"):
        scan_folder(tmp_path / "nope")
    f = tmp_path / "f.jpg"
    f.write_bytes(jpeg)
    with pytest.raises(UserError, match="is not a folder"):
        scan_folder(f)


def test_real_photo_files_are_listed_by_path_with_their_label(tmp_path, photo_path):
    """Real shipped photo files (PNG, JPEG, a GIF) copied into identity folders: the scan lists exactly the
    JPEG/PNG files, by absolute path, under their folder's label, and the GIF as skipped."""
    spec = {"anna": ("astronaut", "t1"), "ben": ("tom_hanks", "rocket"), "cleo": ("tiny",)}
    copied = {}  # copy -> the shipped file
    for folder, names in spec.items():
        (tmp_path / folder).mkdir()
        for name in names:
            src = photo_path(name)
            copied[str(tmp_path / folder / src.name)] = src
            (tmp_path / folder / src.name).write_bytes(src.read_bytes())
    res = scan_folder(tmp_path)
    assert res.identities == ["anna", "ben"]
    listed = [(os.path.relpath(e.path, tmp_path), e.label, e.aligned) for e in res.entries]
    assert listed == [
        ("anna/astronaut.png", 0, 1),
        ("anna/t1.jpg", 0, 1),
        ("ben/Tom_Hanks_54745.png", 1, 1),
        ("ben/rocket.jpg", 1, 1),
    ]
    for e in res.entries:  # each listed path is the copy of the real photo, byte for byte
        assert Path(e.path).read_bytes() == copied[e.path].read_bytes()
    assert dict(res.skipped) == {
        str(tmp_path / "cleo" / "no_time_for_that_tiny.gif"): "not an image (.gif; looking for .jpg, .jpeg, .png)",
        str(tmp_path / "cleo"): "no images in this identity folder",
    }


# --- gpu_align.scan.scan_source: the inputs of a run -------------------------------------------------------------


def _groups(src) -> list[tuple[int, str, str]]:
    """``(index, identity, path relative to the source root)`` of each input."""
    return [(it.index, it.group, os.path.relpath(it.path, src.root)) for it in src.items]


def test_source_folder_lists_identities_in_sorted_order(tmp_path, jpeg):
    _tree(
        tmp_path,
        {"zoe": ["b.jpg", "a.png"], "adam": ["2.jpg", "10.jpg"], "Émile": ["x.jpeg"], "empty": ["notes.txt"]},
        jpeg,
    )
    src = scan_source(tmp_path)
    assert src.kind == "folder" and src.root == str(tmp_path)
    assert _groups(src) == [
        (0, "adam", "adam/10.jpg"),
        (1, "adam", "adam/2.jpg"),
        (2, "zoe", "zoe/a.png"),
        (3, "zoe", "zoe/b.jpg"),
        (4, "Émile", "Émile/x.jpeg"),
    ]
    assert all(os.path.isabs(it.path) and it.landmarks is None and it.bbox is None for it in src.items)
    assert dict(src.skipped) == {
        str(tmp_path / "empty" / "notes.txt"): "not an image (.txt; looking for .jpg, .jpeg, .png)",
        str(tmp_path / "empty"): "no images in this identity folder",
    }


def test_source_min_images_and_limit(tmp_path, jpeg):
    _tree(tmp_path, {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg"], "c": ["1.jpg", "2.jpg", "3.jpg"]}, jpeg)
    src = scan_source(tmp_path, min_images=2)
    assert [g for _, g, _ in _groups(src)] == ["a", "a", "c", "c", "c"]
    assert ("b", "fewer than min_images=2 images (identity has 1)") in [
        (os.path.basename(p), r) for p, r in src.skipped
    ]
    # limit keeps the first inputs (across identities) and renumbers nothing: they are 0.. already
    assert _groups(scan_source(tmp_path, limit=3)) == [(0, "a", "a/1.jpg"), (1, "a", "a/2.jpg"), (2, "b", "b/1.jpg")]
    with pytest.raises(UserError, match="--limit must be at least 1, got 0"):
        scan_source(tmp_path, limit=0)


def test_source_shards_split_identities_into_contiguous_blocks(tmp_path, jpeg):
    # image counts a 3, b 1, c 2, d 2 (8 in all); an identity goes to block floor(first image's position · n / 8)
    _tree(
        tmp_path,
        {"a": ["1.jpg", "2.jpg", "3.jpg"], "b": ["1.jpg"], "c": ["1.jpg", "2.jpg"], "d": ["1.jpg", "2.jpg"]},
        jpeg,
    )
    full = _groups(scan_source(tmp_path))
    by_shard = {n: [[g for _, g, _ in _groups(scan_source(tmp_path, shard=(i, n)))] for i in range(n)] for n in (2, 3)}
    assert by_shard[2] == [["a", "a", "a", "b"], ["c", "c", "d", "d"]]  # positions 0, 3 | 4, 6
    assert by_shard[3] == [["a", "a", "a"], ["b", "c", "c"], ["d", "d"]]  # 0 | 3, 4 | 6
    for n in (2, 3):  # the one splitter, which a Ray run cuts its scan with: the same blocks, all of them at once
        assert [[it.group for it in b] for b in shard_blocks(scan_source(tmp_path).items, n)] == by_shard[n]
    assert [len(b) for b in shard_blocks(scan_source(tmp_path).items, 8)] == [3, 0, 0, 1, 2, 0, 2, 0]
    # every shard numbers its inputs from 0; in shard order they are the unsharded run's inputs
    joined = []
    for i in range(3):
        part = _groups(scan_source(tmp_path, shard=(i, 3)))
        assert [k for k, _, _ in part] == list(range(len(part)))
        joined += [(g, p) for _, g, p in part]
    assert joined == [(g, p) for _, g, p in full]
    # more shards than identities: the ones left empty say so
    with pytest.raises(UserError, match="no images to align in this shard"):
        scan_source(tmp_path, shard=(1, 8))


def test_parse_shard():
    assert parse_shard(None) is None
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "0/0"):
        with pytest.raises(UserError, match="need 0 <= i < n"):
            parse_shard(bad)
    with pytest.raises(UserError, match="must look like i/n"):
        parse_shard("half")


def test_source_lst_gives_landmarks_boxes_and_bad_landmarks(tmp_path):
    lst = tmp_path / "lists" / "in.lst"
    lst.parent.mkdir()
    lines = [
        "0\tpeople/a.jpg\t5",  # detect
        "0\t/abs/b.jpg\t5\t10\t20\t110\t130\t40\t80\t60\t45\t75\t50\t52\t70\t95\t93",  # box + 5 points
        "0\tc.jpg\t7\t10\t20\t110\t130\t40\t40\t60\t45\t75\t50\t50\t70\t95\t93",  # eyes on one point
    ]
    lst.write_text("\n".join(lines) + "\n")
    src = scan_source(lst)
    assert src.kind == "lst" and src.root == str(lst.resolve())
    a, b, c = src.items
    assert (a.index, a.path, a.group, a.landmarks, a.bbox, a.bad_landmarks) == (
        0,
        str(lst.parent.resolve() / "people" / "a.jpg"),  # relative to the .lst's folder
        "5",
        None,
        None,
        None,
    )
    assert (b.path, b.group, b.bbox, b.bad_landmarks) == ("/abs/b.jpg", "5", (10, 20, 110, 130), None)
    # x1..x5 y1..y5 on the line -> (5, 2) points (x, y)
    np.testing.assert_array_equal(b.landmarks, [[40, 50], [80, 52], [60, 70], [45, 95], [75, 93]])
    assert b.landmarks.dtype == np.float32
    assert c.group == "7" and c.landmarks is None and c.bad_landmarks.startswith("bad landmarks: eyes on one point")
    # --root: relative paths start there instead
    other = tmp_path / "photos"
    assert scan_source(lst, lst_root=other).items[0].path == str(other.resolve() / "people" / "a.jpg")
    # the shape of what each line asks for is part of the input records (a resume must see the same)
    records = src.input_records()
    assert [r[4] for r in records] == ["", "10 20 110 130 40 50 80 52 60 70 45 95 75 93", c.bad_landmarks]
    assert [r[2:4] for r in records] == [[-1, -1]] * 3  # none of the files exists


def test_source_fingerprint_follows_the_files(tmp_path, jpeg):
    _tree(tmp_path, {"a": ["1.jpg", "2.jpg"]}, jpeg)
    before = scan_source(tmp_path).fingerprint()
    assert scan_source(tmp_path).fingerprint() == before
    (tmp_path / "a" / "2.jpg").write_bytes(jpeg + b"\0")  # one byte longer
    assert scan_source(tmp_path).fingerprint() != before


def test_source_errors(tmp_path, jpeg):
    with pytest.raises(UserError, match=r"nope: no such folder"):
        scan_source(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.gif").write_bytes(jpeg)
    with pytest.raises(UserError, match=r"no images to align$"):
        scan_source(tmp_path)
