"""The Python API as a user pastes it: README's "Python API" code blocks run, and ``run()`` works from a plain script.

``run()`` starts its packer with multiprocessing's spawn method, which re-imports the caller's main module in the
child unless told otherwise: a script that calls ``run()`` at top level (no ``if __name__ == "__main__":``) must
still complete, and its top-level code must run exactly once. A ``sitecustomize`` on PYTHONPATH makes ``import
torch`` fail in every spawned child (``--multiprocessing-fork`` in its argv), so these runs also prove that the
packer process never imports torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpu_align.demo.data import build_demo_dataset

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# In spawned multiprocessing children only: torch cannot be imported (None in sys.modules makes import fail).
_NO_TORCH_IN_CHILDREN = """\
import sys
if "--multiprocessing-fork" in sys.argv:
    sys.modules["torch"] = None
"""


def readme_api_blocks() -> list[str]:
    """The ```python blocks of README's "## Python API" section (its ### subsections included)."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def _script_env(tmp: Path) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_NO_TORCH_IN_CHILDREN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_script(path: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # `python script.py`, as a user runs it; the timeout turns a hang into a failure
    return subprocess.run(
        [sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with ``photos/`` (2 identities, 5 photos) and ``dataset/`` written by README's run() block."""
    d = tmp_path_factory.mktemp("api")
    build_demo_dataset(d / "photos", identities=2, images_per_identity=2)
    (run_block,) = [b for b in readme_api_blocks() if "RunOptions" in b]
    script = d / "readme_run.py"
    script.write_text(run_block + 'print("processed", result.processed)\n')  # exactly README's lines, top level
    res = _run_script(script, d, _script_env(d))
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"^processed [1-9]", res.stdout, re.M), res.stdout
    return d


def test_readme_has_the_blocks():
    blocks = readme_api_blocks()
    assert len(blocks) == 3, blocks
    assert any("FaceAligner(" in b for b in blocks) and any("DatasetWriter(" in b for b in blocks)


def test_readme_run_block_writes_a_dataset(workdir):
    from packer.verify import verify_dataset

    with_images = verify_dataset(workdir / "dataset")
    assert with_images.ok, with_images.problems
    assert with_images.num_images >= 4


def test_top_level_run_in_a_plain_script_runs_its_code_once(tmp_path):
    """No ``__main__`` guard, a top-level ``rmtree`` and a marker: the packer must not re-run any of it."""
    build_demo_dataset(tmp_path / "photos", identities=2, images_per_identity=2)
    (tmp_path / "sentinel").mkdir()
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent(
            """\
            import shutil
            from pathlib import Path

            from gpu_align.pipeline import RunOptions, run

            with open("marker.txt", "a") as f:  # one line per execution of this file's top level
                f.write("top level ran\\n")
            shutil.rmtree("sentinel")  # a second execution would fail here: the folder is gone
            result = run(RunOptions(src="photos", out="out", device="cpu", quiet=True))
            print("stored", result.found)
            """
        )
    )
    res = _run_script(script, tmp_path, _script_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bootstrapping" not in res.stderr and "packer process died" not in res.stderr
    assert (tmp_path / "marker.txt").read_text() == "top level ran\n"
    assert not (tmp_path / "sentinel").exists()
    assert re.search(r"^stored [1-9]", res.stdout, re.M), res.stdout
    for name in ("train.rec", "train.idx", "train.lst", "property", "report.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_children_cannot_import_torch_under_the_test_sitecustomize(tmp_path):
    """The guard of the two tests above is live: a spawned child that imports torch fails."""
    script = tmp_path / "child_torch.py"
    script.write_text(
        textwrap.dedent(
            """\
            import importlib
            import multiprocessing as mp

            if __name__ == "__main__":
                p = mp.get_context("spawn").Process(target=importlib.import_module, args=("torch",))
                p.start()
                p.join()
                print("exitcode", p.exitcode)
            """
        )
    )
    res = _run_script(script, tmp_path, _script_env(tmp_path))
    assert "exitcode 1" in res.stdout, (res.stdout, res.stderr[-2000:])


def test_readme_aligner_block(load_photo):
    """README's FaceAligner block, with real photos for its placeholder names (and "cpu" without a GPU)."""
    import torch

    from gpu_align import FaceAligner

    (block,) = [b for b in readme_api_blocks() if "FaceAligner(" in b]
    if not torch.cuda.is_available():
        block = block.replace('device="cuda"', 'device="cpu"')
    img0, img1 = load_photo("astronaut"), load_photo("tom_hanks")
    img2 = np.ascontiguousarray(img0[::2, ::2])
    d0 = FaceAligner(device="cpu").detect([img1])[0]
    ns = {"img0": img0, "img1": img1, "img2": img2, "images": [img1, img0], "d0": d0}
    exec(compile(block, "README.md (Python API)", "exec"), ns)
    res = ns["res"]
    assert res.crops.shape[1:] == (112, 112, 3)
    assert bool(res.found[0]) and bool(res.found[1])  # d0 used as given, the astronaut detected
    assert len(ns["dets"]) == 2 and ns["dets"][0].boxes.shape[1] == 4


def test_readme_packer_block(workdir, tmp_path, monkeypatch):
    """README's reader/writer block: "data/faces_emore" is the dataset the run block wrote; items are its crops."""
    from packer.reader import DatasetReader

    (block,) = [b for b in readme_api_blocks() if "DatasetWriter(" in b]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "faces_emore").symlink_to(workdir / "dataset")
    with DatasetReader(workdir / "dataset") as ds:
        items = [(str(r.label), f"photo{r.key}.jpg", r.body) for r in ds]
    monkeypatch.chdir(tmp_path)
    ns = {"items": items}
    exec(compile(block, "README.md (Python API)", "exec"), ns)
    summary = ns["summary"]
    assert summary.num_images == len(items) and summary.num_classes == 2
    with DatasetReader(tmp_path / "out") as out:
        assert [r.body for r in out] == [body for _, _, body in items]
