"""Archive input (issue 12): ``.tar``, ``.tar.gz`` and WebDataset shards give the records of the extracted folder,
byte for byte; bad archives are reported with nothing lost; ``pack train.lst`` and ``--resume`` read archives.

One small demo folder (real photos, ``build_demo_dataset``) is detected once (module fixture); every archive is
written from that folder, so its runs must give the same ``train.rec/.idx/property`` and the same ``train.lst``
apart from the path column (``archive::member`` instead of the file's path).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from gpu_align import cli
from gpu_align.demo.data import build_demo_dataset
from gpu_align.demo.vggface2 import write_vggface2_archive
from gpu_align.pipeline import RunOptions, run
from gpu_align.scan import decode_items, scan_source
from packer.archive import (
    ArchiveReader,
    expand_braces,
    index_archive,
    prefetched,
    scan_archive_source,
    split_member_path,
)
from packer.errors import UserError
from packer.scan import BAD_PATH
from tests.cli_helpers import start
from tests.pack_gate import Gate

FAST = dict(device="cpu", decoder="cpu", batch_size=4, quiet=True)
BYTES = ("train.rec", "train.idx", "property")


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, Path]:
    """(extracted folder ``.../train``, its finished dataset): 3 identities, ~9 demo photos."""
    root = tmp_path_factory.mktemp("vgg") / "train"
    build_demo_dataset(root, identities=3, images_per_identity=3, seed=5)
    out = root.parent / "ref-out"
    res = run(RunOptions(src=str(root), out=str(out), **FAST))
    assert res.found >= 6, res
    return root, out


def _lst_rows(out: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in (out / "train.lst").read_text().splitlines()]


def _same_as_folder(out: Path, ref_out: Path, archive: str) -> None:
    for name in BYTES:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    got, want = _lst_rows(out), _lst_rows(ref_out)
    assert [r[:1] + r[2:] for r in got] == [r[:1] + r[2:] for r in want]  # all but the path column
    for g, w in zip(got, want, strict=True):
        arc, member = split_member_path(g[1])
        assert arc == archive
        assert Path(w[1]).parts[-2:] == Path(member).parts[-2:]  # <identity>/<image>


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _write_tar(path: Path, members: list[tuple[str, bytes]], gz: bool) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_archive_gives_the_folders_bytes(ref, tmp_path, kind):
    """Identities contiguous, photos shuffled inside each (as tar writes a directory tree): same records."""
    root, ref_out = ref
    archive = tmp_path / f"vggface2_train.{kind}"
    write_vggface2_archive(root, archive, seed=3)
    out = tmp_path / "out"
    res = run(RunOptions(src=str(archive), out=str(out), **FAST))
    assert res.failed == 0
    _same_as_folder(out, ref_out, str(archive))


def _shards(root: Path, tmp: Path, cls: bool) -> str:
    """Two WebDataset shards, samples of each identity spread over both (as a shuffled writer leaves them)."""
    files = _files(root)
    idents = sorted({p.parent.name for p in files})
    shards: list[list[tuple[str, bytes]]] = [[], []]
    for k, p in enumerate(reversed(files)):  # neither in order nor grouped
        if cls:  # flat keys, identity from .cls (the label number: numeric order = the folder's sorted order)
            key = f"s{k:04d}"
            shards[k % 2] += [(f"{key}.cls", str(idents.index(p.parent.name)).encode())]
            shards[k % 2] += [(f"{key}.{p.name.replace('.', '_', p.name.count('.') - 1)}", p.read_bytes())]
        else:  # key = <identity>/<stem>: identity from the key's folder
            shards[k % 2] += [(f"{p.parent.name}/{p.name}", p.read_bytes())]
    for i, members in enumerate(shards):
        _write_tar(tmp / f"shard-{i:03d}.tar", members, gz=False)
    return str(tmp / "shard-{000..001}.tar")


def test_webdataset_shards_give_the_folders_bytes(ref, tmp_path):
    root, ref_out = ref
    spec = _shards(root, tmp_path, cls=False)
    assert expand_braces(spec) == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    out = tmp_path / "out"
    run(RunOptions(src=spec, out=str(out), **FAST))
    for name in BYTES:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_webdataset_cls_identities_follow_the_label_order(ref, tmp_path):
    """``.cls`` identities (label numbers) and flat keys: same identity order and photos as the folder (names
    differ, ``s0001.0001_01.jpg``, but sort as the folder's do). A folder of shards is a source too."""
    root, _ = ref
    _shards(root, tmp_path, cls=True)
    src = scan_source(str(tmp_path))
    assert src.kind == "webdataset"
    folder = scan_source(str(root))
    assert [it.group for it in src.items] == [str(sorted({i.group for i in folder.items}).index(i.group))
                                             for i in folder.items]
    got = [x[2]() if callable(x[2]) else x[2] for x in decode_items(src.items)]
    by_ident: dict[str, list[bytes]] = {}
    for it, data in zip(src.items, got, strict=True):
        by_ident.setdefault(it.group, []).append(data)
    for k, ident in enumerate(sorted({i.group for i in folder.items})):
        want = sorted(Path(i.path).read_bytes() for i in folder.items if i.group == ident)
        assert sorted(by_ident[str(k)]) == want


def test_scattered_gzip_is_refused_up_front_and_a_plain_tar_is_not(ref, tmp_path, monkeypatch):
    """Identities stored in reverse order: a .tar.gz would need the whole archive in memory (refused before any
    model loads, with what to do); the same members as a plain .tar are read by offset in any order."""
    root, _ = ref
    members = [(f"train/{p.parent.name}/{p.name}", p.read_bytes()) for p in reversed(_files(root))]
    gz = _write_tar(tmp_path / "rev.tar.gz", members, gz=True)
    plain = _write_tar(tmp_path / "rev.tar", members, gz=False)
    monkeypatch.setenv("GPU_ALIGN_ARCHIVE_BUFFER_MB", "0.05")
    with pytest.raises(UserError, match=r"gunzip -k rev\.tar\.gz.*GPU_ALIGN_ARCHIVE_BUFFER_MB"):
        scan_source(str(gz))
    src, folder = scan_source(str(plain)), scan_source(str(root))
    assert [Path(it.path).name for it in src.items] == [Path(it.path).name for it in folder.items]
    got = [x[2]() for x in decode_items(src.items)]
    assert got == [Path(it.path).read_bytes() for it in folder.items]
    monkeypatch.setenv("GPU_ALIGN_ARCHIVE_BUFFER_MB", "64")  # enough: the stream holds what comes early
    got = [x[2] for x in decode_items(scan_source(str(gz)).items)]
    assert got == [Path(it.path).read_bytes() for it in folder.items]


def test_bad_members_are_reported_and_nothing_else_is_lost(ref, tmp_path):
    """A member that is no image, a text file, ``../x.jpg``, an absolute path, a link and a duplicated name (the
    later copy wins, as tar -x leaves it): each reported with its reason; the photos give the folder's bytes."""
    root, ref_out = ref
    files = _files(root)
    first = files[0]
    ident = first.parent.name
    members = [(f"train/{ident}/zz_fake.jpg", b"this is text, not a JPEG"), (f"train/{ident}/notes.txt", b"hi")]
    members += [("../x.jpg", first.read_bytes()), ("/abs.jpg", first.read_bytes())]
    members += [(f"train/{ident}/{first.name}", b"an older copy")]  # replaced by the real one below
    members += [(f"train/{p.parent.name}/{p.name}", p.read_bytes()) for p in files]
    archive = _write_tar(tmp_path / "bad.tar.gz", members, gz=True)
    with tarfile.open(tmp_path / "link.tar", "w") as tf:  # links: never followed
        for name, data in members[4:]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo(f"train/{ident}/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    out = tmp_path / "out"
    res = run(RunOptions(src=str(archive), out=str(out), **FAST))
    for name in BYTES:  # the fake image failed, everything else is the folder's
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    report = json.loads((out / "report.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert skipped["zz_fake.jpg"].startswith("not an image"), skipped
    assert res.failed == 1
    scan = {s["path"].rpartition("::")[2]: s["reason"] for s in report["extra"]["run"]["scan_skipped"]}
    assert scan[f"train/{ident}/notes.txt"].startswith("not an image (.txt"), scan
    assert scan["../x.jpg"].startswith("unsafe member path") and scan["/abs.jpg"].startswith("unsafe"), scan
    dup = [r for p, r in scan.items() if p.startswith(f"train/{ident}/{first.name} (member #5)")]
    assert dup and dup[0].startswith("duplicate member name"), scan
    linked = scan_source(str(tmp_path / "link.tar"))
    assert ("link member" in dict(linked.skipped)[f"{tmp_path / 'link.tar'}::train/{ident}/link.jpg"])


def test_truncated_gzip_keeps_the_complete_members(ref, tmp_path, capsys):
    """A download cut short: a warning names the archive; the members before the cut are aligned, the one cut
    in half fails as truncated, the rest are missing (the archive ends there), and the run finishes."""
    root, _ = ref
    whole = tmp_path / "whole.tar.gz"
    write_vggface2_archive(root, whole, shuffle=False)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 6 // 10])
    src = scan_source(str(cut))
    assert "the archive ends early" in capsys.readouterr().err
    assert 0 < len(src.items) < len(scan_source(str(root)).items)
    out = tmp_path / "out"
    res = run(RunOptions(src=str(cut), out=str(out), **FAST))
    report = json.loads((out / "report.json").read_text())
    problems = [s for s in report["extra"]["run"]["scan_skipped"] if s["reason"].startswith("truncated")]
    assert problems and problems[0]["path"] == str(cut)
    reasons = [s["reason"] for s in report["skipped"]]
    assert res.found + res.missed + res.failed == len(src.items)
    assert res.failed <= 1 and all(r.startswith("truncated") for r in reasons if "no face" not in r)


@pytest.mark.parametrize("content", [b"just some text\n" * 100, gzip.compress(b"text inside gzip\n" * 100)])
def test_a_file_that_is_not_a_tar_is_refused(tmp_path, content):
    bad = tmp_path / "photos.tar.gz"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="not a tar archive"):
        scan_source(str(bad))
    with pytest.raises(UserError, match="not a tar archive"):
        index_archive(bad)


def test_pack_reads_train_lst_members_back_from_the_archive(ref, tmp_path):
    """``gpu-align pack train.lst`` of an archive run: the members are read again from the archive; same bytes.
    ``--resume`` of a run stopped after its first batch (the ``progress`` hook raises, like Ctrl-C) finishes to
    the same bytes too."""
    root, ref_out = ref
    archive = tmp_path / "a.tar.gz"
    write_vggface2_archive(root, archive, seed=9)
    out = tmp_path / "out"

    def stop(done: int, total: int, counts: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(RunOptions(src=str(archive), out=str(out), **FAST), progress=stop)
    assert (out / "pack.state.json").is_file()
    run(RunOptions(src=str(archive), out=str(out), resume=True, **FAST))
    _same_as_folder(out, ref_out, str(archive))
    again = tmp_path / "again"
    assert cli.run(["pack", str(out / "train.lst"), "--out", str(again), "-q"]) == 0
    for name in (*BYTES, "train.lst"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    moved = tmp_path / "moved"  # a relative archive path in a .lst is relative to the .lst's folder
    moved.mkdir()
    shutil.copy(archive, moved / "a.tar.gz")
    lines = [[r[0], "a.tar.gz::" + split_member_path(r[1])[1], *r[2:]] for r in _lst_rows(out)]
    (moved / "rel.lst").write_text("".join("\t".join(r) + "\n" for r in lines))
    assert [it.member is not None for it in scan_source(str(moved / "rel.lst")).items] == [True] * len(lines)


def test_lst_of_an_archive_lists_the_folders_photos_as_members(ref, tmp_path):
    """``gpu-align lst ARCHIVE``: the lines of ``gpu-align lst`` of the extracted folder (same order, labels,
    aligned flag), each naming ``ARCHIVE::MEMBER``; ``--relative`` names the archive from the .lst's folder, and
    ``run`` of that .lst reads the members."""
    root, _ = ref
    archive = tmp_path / "vggface2_train.tar.gz"
    write_vggface2_archive(root, archive, seed=4)
    assert cli.run(["lst", str(root), "-o", str(tmp_path / "folder.lst"), "--aligned", "0", "-q"]) == 0
    assert cli.run(["lst", str(archive), "-o", str(tmp_path / "archive.lst"), "--aligned", "0", "-q"]) == 0
    folder = [r.split("\t") for r in (tmp_path / "folder.lst").read_text().splitlines()]
    got = [r.split("\t") for r in (tmp_path / "archive.lst").read_text().splitlines()]
    assert [(r[0], r[2]) for r in got] == [(r[0], r[2]) for r in folder]
    for g, f in zip(got, folder, strict=True):
        arc, member = split_member_path(g[1])
        assert arc == str(archive)
        assert Path(member).parts[-2:] == Path(f[1]).parts[-2:]
    sub = tmp_path / "lists"
    sub.mkdir()
    assert cli.run(["lst", str(archive), "-o", str(sub / "rel.lst"), "--relative", "--aligned", "0", "-q"]) == 0
    rel = [r.split("\t")[1] for r in (sub / "rel.lst").read_text().splitlines()]
    assert all(p.startswith("../vggface2_train.tar.gz::") for p in rel), rel[:2]
    items = scan_source(str(sub / "rel.lst")).items
    assert [it.member.path for it in items] == [g[1] for g in got]


@pytest.mark.slow
def test_sigkilled_archive_run_resumes_to_the_same_bytes(ref, tmp_path):
    """kill -9 of the whole run (main process and packer) of a ``.tar.gz`` while its packer is held after its
    first commit (tests/pack_gate.py: no sleep races the signal): ``--resume`` re-reads the archive and finishes
    with the records of the uninterrupted folder run."""
    root, ref_out = ref
    archive = tmp_path / "vggface2_train.tar.gz"
    write_vggface2_archive(root, archive, seed=2)
    out = tmp_path / "out"
    fast = ["--device", "cpu", "--decoder", "cpu", "--batch-size", "4", "-q"]
    gate = Gate.at(tmp_path, "commit", done=1, phase="stream", until="killed")
    proc = start("gpu_align", "run", str(archive), "--out", str(out), *fast, env=gate.env())
    state = gate.wait(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert state["done"] >= 1 and (out / "pack.state.json").is_file()
    proc = start("gpu_align", "run", str(archive), "--out", str(out), *fast, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    _same_as_folder(out, ref_out, str(archive))


# ------------------------------------------------------------------------------------------ review fixes (packer)


def _fds_to(path: Path) -> int:
    """How many descriptors of this process are open on ``path`` (Linux /proc)."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd) == str(path)
    return n


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_gzip_archives_are_closed_when_refused_and_after_reading(tmp_path):
    """tarfile never closes a file object it is given: the gzip stream of a refused ``.tar.gz`` stayed open for as
    long as the error was kept, and a stream read by :meth:`ArchiveReader.ordered` until garbage collection."""
    bad = tmp_path / "photos.tar.gz"
    bad.write_bytes(gzip.compress(b"text inside gzip\n" * 100))
    errors = []
    for _ in range(3):
        with pytest.raises(UserError) as e:
            index_archive(bad)
        errors.append(e.value)
    assert "a not a" not in str(errors[0]) and _fds_to(bad) == 0
    good = _write_tar(tmp_path / "good.tar.gz", [(f"n{i}/{i}.jpg", b"x" * 100) for i in range(4)], gz=True)
    idx = index_archive(good)
    with ArchiveReader(1 << 20) as reader:
        stream = reader.ordered(idx.files)
        assert next(stream) == b"x" * 100
        assert _fds_to(good) == 1
        stream.close()
        assert _fds_to(good) == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_prefetched_closes_its_source_when_the_consumer_stops(tmp_path):
    """Closing the consumer early (an error, Ctrl-C) stops the producer thread and closes the archive it read."""
    archive = _write_tar(tmp_path / "a.tar.gz", [(f"n{i}/{i}.jpg", b"y" * 5000) for i in range(50)], gz=True)
    idx = index_archive(archive)
    with ArchiveReader(1 << 20) as reader:
        source = reader.ordered(idx.files)  # still referenced here: garbage collection would not close it
        got = prefetched(source, depth=2)
        assert next(got) == b"y" * 5000
        got.close()
        assert _fds_to(archive) == 0


def test_a_tab_or_newline_in_archive_paths_is_refused_or_skipped(tmp_path, capsys):
    """A ``.lst`` line cannot hold a tab or newline: ``gpu-align lst`` of such an archive crashed with a ValueError
    traceback. Now the archive's own path (or the folder all members lie in) is a UserError, and a WebDataset
    sample inside such a folder is skipped with the folder scan's reason, the others kept."""
    members = [(f"tr\tain/n{i}/{j}.jpg", b"z") for i in range(2) for j in range(2)]
    folder = tmp_path / "a\tb"
    folder.mkdir()
    for archive, these in ((folder / "a.tar", members[:1]), (tmp_path / "b.tar", members)):
        _write_tar(archive, these, gz=False)
        with pytest.raises(UserError, match="tab/newline"):
            scan_archive_source(str(archive))
    wds = _write_tar(
        tmp_path / "wds.tar",
        [("ok/n1/1.jpg", b"z"), ("ok/n1/1.cls", b"n1"), ("b\nad/n2/2.jpg", b"z"), ("b\nad/n2/2.cls", b"n2")],
        gz=False,
    )
    kind, _, scan = scan_archive_source(str(wds))
    assert kind == "webdataset" and [m.name for _, m in scan.entries] == ["ok/n1/1.jpg"]
    assert dict(scan.skipped)[f"{wds}::b\nad/n2/2.jpg"] == BAD_PATH
    assert cli.run(["lst", str(tmp_path / "b.tar"), "-o", str(tmp_path / "b.lst")]) == 2  # not a traceback
    assert "tab/newline" in capsys.readouterr().err


def test_webdataset_identities_are_folder_names(tmp_path):
    """A ``.cls`` or ``.json`` identity becomes the ``--save-crops`` folder ``<identity>/``: ``..``, ``../x`` or a
    name with a ``/`` would write outside it. Such a class is not used; the key's folder names the identity."""
    members = [
        ("k/a/1.jpg", b"z"), ("k/a/1.json", json.dumps({"identity": "../../escape"}).encode()),
        ("k/b/2.jpg", b"z"), ("k/b/2.cls", b".."),
        ("k/c/3.jpg", b"z"), ("k/c/3.json", json.dumps({"identity": " 7 "}).encode()),
    ]
    wds = _write_tar(tmp_path / "wds.tar", members, gz=False)
    _, _, scan = scan_archive_source(str(wds))
    assert sorted(scan.identities) == ["7", "a", "b"]
