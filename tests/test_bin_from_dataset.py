"""`gpu-align bin --from-dataset`: balanced, seeded, distinct same/different pairs drawn from a real dataset (written
with DatasetWriter) or a crop folder, read back with read_bin; held-out identity lists; the errors."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from packer.binfile import draw_pairs, read_bin
from packer.cli import run
from packer.layout import DatasetWriter, PackItem

# identity -> image count: one identity with a single image (only in different pairs), uneven sizes
SIZES = {"ann": 5, "ben": 2, "cat": 1, "dan": 8, "eve": 3, "fay": 4}


def _crop(label: int, i: int) -> bytes:
    """A 112x112 JPEG unique to (label, i)."""
    rng = np.random.default_rng([label, i])
    return simplejpeg.encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), quality=90)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(dataset dir, flat dataset dir, crop folder, body -> (identity, label, i))."""
    tmp = tmp_path_factory.mktemp("bin")
    who: dict[bytes, tuple[str, int, int]] = {}
    folder = tmp / "crops"
    for label, (name, n) in enumerate(SIZES.items()):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            body = _crop(label, i)
            who[body] = (name, label, i)
            (folder / name / f"{i}.jpg").write_bytes(body)
    dirs = []
    for layout in ("insightface", "flat"):
        out = tmp / layout
        with DatasetWriter(out, layout=layout) as w:
            for name, n in SIZES.items():
                for i in range(n):
                    w.add(PackItem(group=name, body=(folder / name / f"{i}.jpg").read_bytes(),
                                   source=str(folder / name / f"{i}.jpg")))  # fmt: skip
            w.close()
        dirs.append(out)
    return dirs[0], dirs[1], folder, who


def _check(path, who, n_pairs, allowed=None):
    images, issame = read_bin(path)
    assert len(issame) == n_pairs and issame == [k % 2 == 0 for k in range(n_pairs)]  # alternating: balanced folds
    seen = set()
    for k, same in enumerate(issame):
        a, b = who[images[2 * k]], who[images[2 * k + 1]]
        assert a != b  # never an image paired with itself
        assert (a[1] == b[1]) == same  # same pairs share the label, different pairs do not
        if allowed is not None:
            assert a[0] in allowed and b[0] in allowed
        key = frozenset((a, b))
        assert key not in seen  # no pair twice, in either order
        seen.add(key)
    return images, issame


@pytest.mark.parametrize("source", ["insightface", "flat", "folder"])
def test_balanced_distinct_and_labelled(data, tmp_path, source, capsys):
    ds, flat, folder, who = data
    src = {"insightface": ds, "flat": flat, "folder": folder}[source]
    out = tmp_path / "mine.bin"
    assert run(["bin", "--from-dataset", str(src), "--pairs", "20", "--out", str(out), "-q"]) == 0
    assert "20 pairs (10 same, 10 different) drawn from 6 identities" in capsys.readouterr().out
    _check(out, who, 20)


def test_deterministic_per_seed(data, tmp_path):
    ds, _, folder, _ = data
    paths = {}
    for name, src, seed in (("a", ds, "3"), ("b", ds, "3"), ("c", ds, "4"), ("d", folder, "3")):
        paths[name] = tmp_path / f"{name}.bin"
        assert run(["bin", "--from-dataset", str(src), "--pairs", "16", "--seed", seed, "--out", str(paths[name]),
                    "-q"]) == 0  # fmt: skip
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert paths["a"].read_bytes() != paths["c"].read_bytes()
    # the crop folder and the dataset made from it hold the same images in the same order: the same pairs
    assert read_bin(paths["a"]) == read_bin(paths["d"])


def test_every_distinct_pair_at_capacity(data, tmp_path):
    """Asking for every same pair there is (10 + 1 + 0 + 28 + 3 + 6 = 48): each exactly once; one more is refused."""
    ds, _, _, who = data
    same_cap = sum(n * (n - 1) // 2 for n in SIZES.values())
    assert same_cap == 48
    out = tmp_path / "all.bin"
    assert run(["bin", "--from-dataset", str(ds), "--pairs", str(2 * same_cap), "--out", str(out), "-q"]) == 0
    images, _ = _check(out, who, 2 * same_cap)
    same_pairs = {frozenset((who[images[2 * k]], who[images[2 * k + 1]])) for k in range(0, 2 * same_cap, 2)}
    assert len(same_pairs) == same_cap  # every same-identity pair exactly once
    assert run(["bin", "--from-dataset", str(ds), "--pairs", str(2 * same_cap + 2), "--out", str(out),
                "--overwrite"]) == 2  # fmt: skip


def test_held_out_identities(data, tmp_path, capsys):
    ds, _, folder, who = data
    ids = tmp_path / "heldout.txt"
    ids.write_text("# held out\nann\n\n3\ncat\n")  # names (train.lst's folders) and a label (3 = dan)
    out = tmp_path / "held.bin"
    assert run(["bin", "--from-dataset", str(ds), "--identities", str(ids), "--pairs", "12", "--out", str(out),
                "-q"]) == 0  # fmt: skip
    assert "drawn from 3 identities" in capsys.readouterr().out
    _check(out, who, 12, allowed={"ann", "dan", "cat"})
    images, _ = read_bin(out)
    assert {who[b][0] for b in images} == {"ann", "dan", "cat"}  # cat (one image) appears in different pairs

    ids.write_text("ann\ndan\n")
    assert run(["bin", "--from-dataset", str(folder), "--identities", str(ids), "--pairs", "8", "--out", str(out),
                "--overwrite", "-q"]) == 0  # fmt: skip
    _check(out, who, 8, allowed={"ann", "dan"})

    ids.write_text("ann\nzed\n7\n")
    assert run(["bin", "--from-dataset", str(ds), "--identities", str(ids), "--pairs", "4", "--out",
                str(tmp_path / "x.bin")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "2 listed identities are not in the source: 'zed', '7'" in err
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize(
    "args, listed, message",
    [
        (["--pairs", "7"], None, "--pairs must be a positive even number"),
        (["--pairs", "0"], None, "--pairs must be a positive even number"),
        (["--pairs", "1000"], None, "but these images give only 48; use --pairs 96 or fewer"),
        (["--pairs", "4"], "ann\n", "need at least 2 identities with images; found 1"),
        (["--pairs", "4"], "cat\n", "need at least 2 identities with images; found 1"),
        (["--pairs", "2"], "cat\nben\n", None),  # ben's one pair + one different pair: fits exactly
        (["--pairs", "4"], "cat\nben\n", "give only 1; use --pairs 2 or fewer"),
        ([], None, "--from-dataset needs --pairs N"),
    ],
)
def test_errors(data, tmp_path, capsys, args, listed, message):
    ds, _, _, _ = data
    cmd = ["bin", "--from-dataset", str(ds), *args, "--out", str(tmp_path / "x.bin"), "-q"]
    if listed is not None:
        (tmp_path / "ids.txt").write_text(listed)
        cmd += ["--identities", str(tmp_path / "ids.txt")]
    rc = run(cmd)
    if message is None:
        assert rc == 0
        return
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


def test_no_identity_with_two_images(tmp_path, capsys):
    out = tmp_path / "ds"
    with DatasetWriter(out) as w:
        for k in range(3):
            w.add(PackItem(group=f"p{k}", body=_crop(k, 0), source=f"/x/p{k}/0.jpg"))
        w.close()
    assert run(["bin", "--from-dataset", str(out), "--pairs", "2", "--out", str(tmp_path / "x.bin")]) == 2
    assert "need an identity with at least 2 images" in capsys.readouterr().err


def test_pairs_file_and_from_dataset_exclusive(data, tmp_path, capsys):
    ds, _, _, _ = data
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg 1\n")
    assert run(["bin", str(tmp_path / "pairs.txt"), "--from-dataset", str(ds), "--out", str(tmp_path / "x.bin")]) == 2
    assert "either a PAIRS file or --from-dataset" in capsys.readouterr().err
    assert run(["bin", str(tmp_path / "pairs.txt"), "--pairs", "4", "--out", str(tmp_path / "x.bin")]) == 2
    assert "--pairs goes with --from-dataset" in capsys.readouterr().err


def test_draw_pairs_large_and_spread():
    """The rejection path (far below capacity): distinct, correct, and spread over identities, not sizes."""
    groups = [[(g, i) for i in range(300 if g == 0 else 3)] for g in range(200)]  # one huge identity, many small
    pairs = draw_pairs(groups, 1000, seed=5)
    assert pairs == draw_pairs(groups, 1000, seed=5) and pairs != draw_pairs(groups, 1000, seed=6)
    assert len({frozenset((a, b)) for a, b, _ in pairs}) == 1000
    assert all((a[0] == b[0]) == same for a, b, same in pairs)
    same_from_huge = sum(a[0] == 0 for a, _, same in pairs if same)
    # uniform over identities: the huge one gives ~1/200 of the 500 same pairs, not its 99 % share of all pairs
    assert same_from_huge < 20
    assert len({a[0] for a, _, same in pairs if same}) >= 150
