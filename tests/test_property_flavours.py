"""``property`` files as other InsightFace tools write them: one line (``num_classes,112,112``, ours and the released
datasets'), two lines (``RecBuilder``: + the image count) and four lines (``rec2shufrec.py``). Every dataset tool
reads the first line; ``verify`` checks a second-line count against the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packer.cli import run
from packer.reader import read_property
from tests.tools_fixtures import identities, write_face2rec2

COUNTS = (3, 2)  # 5 images, 2 identities
FLAVOURS = {
    "one-line": "2,112,112\n",
    "recbuilder": "2,112,112\n5\n",
    "rec2shufrec": "2,112,112\n5\n0\n1\n",  # lines 3-4 are not a count: ignored
}


@pytest.fixture(params=sorted(FLAVOURS))
def dataset(request, tmp_path) -> Path:
    d = tmp_path / request.param
    write_face2rec2(d, identities(COUNTS), label_style="scalar")
    (d / "property").write_text(FLAVOURS[request.param])
    return d


def test_read_property_first_line_and_count(tmp_path):
    p = tmp_path / "property"
    for text, count in [("7,112,96\n", None), ("7,112,96\n123\n", 123), ("7,112,96\n123\n4\nx\n", 123)]:
        p.write_text(text)
        prop = read_property(p)
        assert (prop.num_classes, prop.height, prop.width, prop.num_images) == (7, 112, 96, count)
    p.write_text("7,112\n5\n")
    with pytest.raises(Exception, match="first line"):
        read_property(p)


def test_verify(dataset, capsys):
    assert run(["verify", str(dataset)]) == 0, capsys.readouterr()


def test_verify_reports_a_count_that_disagrees(tmp_path, capsys):
    d = tmp_path / "stale"
    write_face2rec2(d, identities(COUNTS), label_style="scalar")
    (d / "property").write_text("2,112,112\n9\n")
    assert run(["verify", str(d), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"] == {"property": 1}
    assert "second line says 9 images, the dataset has 5" in json.dumps(rep["problems"])


def test_inspect(dataset, capsys):
    assert run(["inspect", str(dataset), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["property"]["num_classes"] == 2 and info["property"]["height"] == 112


def test_unpack(dataset, tmp_path):
    out = tmp_path / "imgs"
    assert run(["unpack", str(dataset), "--out", str(out), "-q"]) == 0
    assert len(list(out.rglob("*.jpg"))) == 5


def test_to_flat(dataset, tmp_path):
    out = tmp_path / "flat"
    assert run(["to-flat", str(dataset), "--out", str(out)]) == 0
    assert (out / "property").read_text() == "2,112,112\n"
    assert run(["verify", str(out)]) == 0


def test_merge(dataset, tmp_path):
    other = tmp_path / "other"
    write_face2rec2(other, identities(COUNTS), label_style="scalar")
    (other / "property").write_text(FLAVOURS["recbuilder"])
    out = tmp_path / "merged"
    assert run(["merge", str(dataset), str(other), "--out", str(out), "-q"]) == 0
    assert (out / "property").read_text() == "4,112,112\n"
    assert run(["verify", str(out)]) == 0
