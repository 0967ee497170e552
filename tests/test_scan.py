"""packer.scan (dir2lst): sorted identities, contiguous labels, every skipped file reported with a reason."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

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


def test_real_decodable_images_listed(tmp_path, jpeg):
    _tree(tmp_path, {"x": ["1.jpg"]}, jpeg)
    (e,) = scan_folder(tmp_path).entries
    img = cv2.imread(e.path)
    assert img.shape == (112, 112, 3) and np.asarray(img).std() > 10
