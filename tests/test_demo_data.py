"""The demo dataset builder: layout, variety, determinism, and that MTCNN finds the identity's face."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_align.decode import make_decoder, probe_image
from gpu_align.demo.data import UNICODE_IDENTITY, build_demo_dataset
from packer.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo dataset (what ``gpu-align demo`` packs)."""
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "faces")


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_counts_and_variety(demo):
    root = demo.root
    folders = sorted(p.name for p in root.iterdir())
    assert folders == demo.identities and len(folders) == 24
    assert [n for n in folders if not n.isascii()] == [UNICODE_IDENTITY]
    files = _files(root)
    assert len(files) == demo.images == len(demo.boxes) and 200 <= demo.images <= 400
    assert {p.relative_to(root).as_posix() for p in files} == set(demo.boxes)
    assert all(demo.counts[n] == len(list((root / n).iterdir())) >= 2 for n in folders)
    assert len(set(demo.counts.values())) > 3  # uneven identities, like real datasets

    infos = {p.relative_to(root).as_posix(): probe_image(p.read_bytes()) for p in files}
    rotated = [r for r, i in infos.items() if i.orientation != 1]
    assert len(rotated) == demo.exif_rotated and len({infos[r].orientation for r in rotated}) >= 4
    assert sum(i.format == "PNG" for i in infos.values()) == demo.png >= 5
    assert sum(i.format == "JPEG" and i.components == 1 for i in infos.values()) >= 5  # real grayscale JPEGs
    assert sum(r.endswith(".jpeg") for r in infos) >= 1
    for rel, info in infos.items():
        assert 150 <= info.width <= 800 and 150 <= info.height <= 800, rel
        w, h = (info.height, info.width) if info.orientation >= 5 else (info.width, info.height)  # as displayed
        x1, y1, x2, y2 = demo.boxes[rel]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, rel
        assert x2 - x1 >= 30, rel
    # the real faces come first; later identities say they are synthetic variants
    assert "synthetic" not in demo.sources["n000001"] and "synthetic variant" in demo.sources["n000024"]


def test_deterministic_for_a_seed(tmp_path):
    a = build_demo_dataset(tmp_path / "a", identities=5, images_per_identity=3, seed=7)
    b = build_demo_dataset(tmp_path / "b", identities=5, images_per_identity=3, seed=7, threads=1)
    c = build_demo_dataset(tmp_path / "c", identities=5, images_per_identity=3, seed=8)
    fa, fb = _files(a.root), _files(b.root)
    assert [p.relative_to(a.root) for p in fa] == [p.relative_to(b.root) for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb, strict=True))
    assert a.boxes == b.boxes
    assert a.boxes != c.boxes


def test_refuses_non_empty_root_unless_overwrite(tmp_path):
    build_demo_dataset(tmp_path, identities=2, images_per_identity=2)
    with pytest.raises(UserError, match="not empty"):
        build_demo_dataset(tmp_path, identities=2, images_per_identity=2)
    (tmp_path / "keep.txt").write_text("user file")
    s = build_demo_dataset(tmp_path, identities=2, images_per_identity=2, seed=1, overwrite=True)
    assert (tmp_path / "keep.txt").exists()  # only the builder's own identity folders are replaced
    assert len(_files(tmp_path)) == s.images + 1


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_mtcnn_finds_the_identity_face(demo):
    """Every real face source, each in its smallest demo image (keeps MTCNN on CPU fast): the most confident
    detection is the pasted face (IoU with the recorded box), EXIF orientation applied by the decoder."""
    from gpu_align.detect.mtcnn import MTCNN

    by_identity = {}
    for rel in demo.boxes:
        ident = rel.split("/")[0]
        x1, y1, x2, y2 = demo.boxes[rel]
        by_identity.setdefault(ident, []).append(((x2 - x1) * (y2 - y1), rel))
    # real faces (identities 1-10) plus a few synthetic variants; a small face-size image of each
    chosen = [min(v)[1] for k, v in sorted(by_identity.items()) if "synthetic" not in demo.sources[k]]
    chosen += [min(by_identity[k])[1] for k in ("n000013", "n000016", "n000019")]
    with make_decoder("cpu") as dec:
        batch = dec.decode_paths([demo.root / r for r in chosen])
    assert not batch.failures
    detections = MTCNN().detect(batch.images)
    for rel, det in zip(chosen, detections, strict=True):
        assert len(det.scores) >= 1, rel
        best = det.boxes[int(np.argmax(det.scores.numpy()))].tolist()
        assert _iou(best, demo.boxes[rel]) > 0.4, rel
