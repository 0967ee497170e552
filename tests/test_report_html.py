"""report.html: self-contained (no external references, every image an inline data URI that decodes), with the
counts, the identity strips read back from train.rec, the skipped photos and reasons, and the multi-face boxes."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from packer.layout import DatasetWriter, PackItem
from packer.report_html import REPORT_HTML_NAME, render_report_html, write_report_html

GREEN, ORANGE = (40, 200, 60), (255, 140, 0)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        else:
            self.text.append(data)


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def _images(page: _Page) -> list[Image.Image]:
    out = []
    for tag, attrs in page.tags:
        if tag == "img":
            src = attrs["src"] or ""
            head, _, data = src.partition(",")
            assert head in ("data:image/jpeg;base64", "data:image/png;base64"), src[:60]
            im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            im.load()
            assert (im.width, im.height) == (int(attrs["width"]), int(attrs["height"]))
            out.append(im)
    return out


def _jpeg(rgb: tuple[int, int, int], h: int = 112, w: int = 112) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rgb
    img[h // 3 : h // 2, w // 4 : 3 * w // 4] = 255  # some structure, so that the JPEG is not one flat colour
    return simplejpeg.encode_jpeg(img, quality=90)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A run-like dataset: 3 identities, 4 skips of different kinds (one a FIFO), one multi-face note."""
    tmp = tmp_path_factory.mktemp("rep")
    src = tmp / "photos"
    (src / "bob").mkdir(parents=True)
    photo = src / "bob" / "scene.jpg"  # a decodable source photo that was skipped (e.g. no face)
    photo.write_bytes(_jpeg((30, 60, 200), 400, 300))
    (src / "bob" / "empty.jpg").write_bytes(b"")
    fifo = src / "bob" / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would block forever: the report must not open it
    group = src / "carol" / "group.jpg"
    group.parent.mkdir()
    group.write_bytes(simplejpeg.encode_jpeg(np.full((200, 400, 3), 128, np.uint8), quality=90))
    out = tmp / "ds"
    with DatasetWriter(out) as w:
        for i in range(5):
            w.add(PackItem(group="alice", body=_jpeg((200, 30, 30)), source=str(src / "alice" / f"{i}.jpg")))
        w.add(PackItem(group="bob", body=None, source=str(photo), skip_reason="no face: nothing above 0.9"))
        w.add(PackItem(group="bob", body=None, source=str(src / "bob" / "empty.jpg"), skip_reason="empty file"))
        w.add(PackItem(group="bob", body=None, source=str(fifo), skip_reason="unreadable: not a regular file"))
        w.add(PackItem(group="bob", body=None, source=str(src / "bob" / "gone.jpg"), skip_reason="missing file"))
        for i in range(2):
            w.add(PackItem(group="bob", body=_jpeg((30, 200, 30)), source=str(src / "bob" / f"{i}.jpg")))
        note = {
            "kind": "multi-face",
            "faces": 2,
            "select": "center-largest",
            "chosen": {"box": [40.0, 40.0, 160.0, 160.0], "score": 0.999},
            "runner_up": {"box": [240.0, 40.0, 360.0, 160.0], "score": 0.95},
        }
        w.add(PackItem(group="carol", body=_jpeg((30, 30, 200)), source=str(group), note=note))
        w.close(
            report_extra={
                "run": {
                    "this_invocation": {"seconds": 1.5, "images_per_second": 8.0, "stage_seconds": {"detect": 1.25}}
                }
            }
        )
    return out


def test_self_contained_and_complete(dataset):
    path = write_report_html(dataset)
    assert path == dataset / REPORT_HTML_NAME and not (dataset / (REPORT_HTML_NAME + ".tmp")).exists()
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    # nothing outside the file: no scripts, stylesheets, frames, fonts, links or url() in the CSS
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for key in ("src", "href", "srcset", "action"):
            if attrs.get(key) is not None:
                assert attrs[key].startswith("data:image/"), (tag, key, attrs[key][:60])
    assert "url(" not in page.style and "@import" not in page.style and "http" not in text.replace("http-equiv", "")
    images = _images(page)
    words = " ".join(page.text)
    for reason in ("no face: nothing above 0.9", "empty file", "unreadable: not a regular file", "missing file"):
        assert reason in words
    report = json.loads((dataset / "report.json").read_text())
    assert report["counts"] == {"inputs": 12, "images": 8, "classes": 3, "skipped": 4, "dropped_identities": 0}
    assert "Skipped photos (4)" in words and "Photos with several faces (1)" in words and "8.0" in words

    # one strip per identity, its crops read back from train.rec (alice red, bob green, carol blue)
    strips = [im for im in images if im.height == 72]
    assert len(strips) == 3
    assert [s.width for s in strips] == [5 * 72 + 4 * 2, 2 * 72 + 2, 72]
    means = [np.asarray(s.convert("RGB"))[60:, :, :].reshape(-1, 3).mean(0) for s in strips]
    assert [int(np.argmax(m)) for m in means] == [0, 1, 2]
    assert "alice" in words and "carol" in words  # identity names from train.lst

    # skipped: a thumbnail of the photo that decodes, placeholders for the rest (the FIFO never opened)
    thumbs = [im for im in images if im.height != 72 and im.width <= 96]
    assert len(thumbs) == 1 and thumbs[0].size == (72, 96)
    assert np.argmax(np.asarray(thumbs[0].convert("RGB")).reshape(-1, 3).mean(0)) == 2  # the blue scene
    placeholders = [t for t, a in page.tags if t == "div" and a.get("class") == "ph"]
    assert len(placeholders) == 3
    assert "empty file" in words and "not a regular file" in words and "No such file" in words

    # multi-face: the chosen box drawn in green on the left face, the runner-up in orange on the right
    group = next(im for im in images if im.width == 240)
    rgb = np.asarray(group.convert("RGB")).astype(int)
    assert rgb.shape == (120, 240, 3)

    def near(colour, region):
        return (np.abs(region - np.array(colour)).sum(-1) < 90).sum()

    left, right = rgb[:, :120], rgb[:, 120:]
    assert near(GREEN, left) > 100 and near(GREEN, right) == 0
    assert near(ORANGE, right) > 100 and near(ORANGE, left) == 0


def test_thumbnail_cap_lists_the_rest(dataset):
    text = render_report_html(dataset, max_thumbs=1, max_rows=1)
    page = _parse(text)
    images = _images(page)
    thumbs = [im for im in images if im.height != 72]
    assert len(thumbs) == 2 and thumbs[1].width == 240  # the first skipped photo; the multi-face one (own budget)
    words = " ".join(page.text)
    assert "3 more without thumbnails" in words and "… and 2 more in report.json" in words
    assert "Photos with several faces (1)" in words and "2 faces, center-largest" in words


def test_many_identities_are_sampled(tmp_path):
    out = tmp_path / "ds"
    with DatasetWriter(out) as w:
        for k in range(30):
            w.add(PackItem(group=f"id{k:02d}", body=_jpeg((k * 8, 100, 100)), source=f"/x/id{k:02d}/0.jpg"))
        w.close()
    page = _parse(render_report_html(out, max_identities=5))
    assert len([im for im in _images(page) if im.height == 72]) == 5
    assert "5 of 30 identities shown" in " ".join(page.text)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(dataset):
    """A real browser, offline: the page renders with its inline images (green box pixels on screen)."""
    path = write_report_html(dataset)
    shot = dataset.parent / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={shot}", "--window-size=1000,1600", path.as_uri(),
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (np.abs(rgb - np.array(GREEN)).sum(-1) < 60).sum() > 200  # the drawn chosen box
    assert (np.abs(rgb - np.array((200, 30, 30))).sum(-1) < 60).sum() > 2000  # alice's red crops
