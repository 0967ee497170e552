"""scripts/gpu_check.sh's plumbing without a GPU: the --cpu-dry-run runs every step on the CPU (about 25 s on 2
cores), and its comparison and results writing are checked on what it really produced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    out, work, results = base / "out", base / "work", base / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Decode\n\nkept as it was\n", encoding="utf-8")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_OUT=str(out),
        GPU_CHECK_WORK=str(work),  # given: the script keeps it, so the test can read the runs
        GPU_CHECK_RESULTS=str(results),
    )
    env.pop("OUT", None)
    real = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run"], cwd=base, env=env, capture_output=True, text=True, timeout=150
    )
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == real, "the dry run must not touch the real RESULTS.md"
    return proc, out, work, results


@pytest.mark.slow
def test_dry_run_passes_and_prints_one_summary(dry_run):
    proc, out, _, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for step in ("env", "install", "dataset", "gpu-subset", "cpu-subset", "compare", "gpu-main", "verify"):
        assert f"   {step}: ok in " in text, step
    for step in ("tests", "dali-install", "device-ops"):
        assert f"== {step}: skipped: no GPU" in text, step
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    assert summary.strip() in text  # the printed summary is the saved one
    for label in ("end to end:", "per stage:", "GPU memory:", "decode cpu:", "vs CPU path:", "GPU vs CPU:", "verify:"):
        assert f"  {label}" in summary, label
    assert "GPU vs CPU:     OK: flips 0" in summary
    assert "result:         all steps passed or skipped" in summary
    assert "gpu_check.sh: all steps passed" in text
    # everything the device tool brings back is in the output folder, within its 8-file limit
    files = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.log", "summary.txt", "summary.json", "RESULTS-gpu-section.md", "report_gpu.json"} <= set(files)
    assert len(files) <= 8, files
    log = (out / "gpu_check.log").read_text(encoding="utf-8")
    assert "---- log of gpu-main" in log and "---- end of verify (rc 0)" in log


@pytest.mark.slow
def test_dry_run_summary_numbers_and_results_section(dry_run):
    _, out, _, results = dry_run
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert s["mode"] == "dry" and s["failed"] == []
    assert s["main"]["photos"] == 60 and s["main"]["per_second"] > 0
    assert s["main"]["decoder"].startswith("CpuDecoder")
    # the same photos through the same CPU path: identical results, so the comparison is exact
    cmp_ = s["compare"]
    assert cmp_["ok"] and cmp_["flips"] == 0 and cmp_["found_both"] >= 25
    assert cmp_["mean_point_error_px"] == 0 and cmp_["crop_mad_mean"] == 0
    assert cmp_["crops_compared"] == cmp_["found_both"]
    text = results.read_text(encoding="utf-8")
    assert "## Decode\n\nkept as it was\n" in text  # the other sections stay
    assert text.count("## GPU check (CPU dry run)") == 1
    section = (out / "RESULTS-gpu-section.md").read_text(encoding="utf-8")
    assert section.startswith("## GPU check (CPU dry run)\n")
    assert "| End to end (in the run) |" in section and "**CPU dry run**" in section
    assert "Command: `bash scripts/gpu_check.sh --cpu-dry-run`" in section
    # apply-results (what a session runs on the files a device brought back) writes the same section again
    again = results.with_name("again.md")
    shutil.copyfile(results, again)
    assert gpu_check.main(["apply-results", str(out / "RESULTS-gpu-section.md"), "--results", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == text


@pytest.mark.slow
def test_compare_catches_moved_landmarks_and_flips(dry_run, tmp_path):
    """The comparison fails on a real difference: one photo's landmarks moved by 3 px, one photo dropped."""
    _, _, work, _ = dry_run
    gpu = tmp_path / "gpu500"
    shutil.copytree(work / "gpu500", gpu)
    lines = (gpu / "train.lst").read_text(encoding="utf-8").splitlines()
    f = lines[0].split("\t")
    f[7:17] = [f"{float(v) + 3:.2f}" for v in f[7:17]]  # x1..x5, y1..y5 shifted by (3, 3)
    (gpu / "train.lst").write_text("\n".join(["\t".join(f), *lines[2:]]) + "\n", encoding="utf-8")
    res = gpu_check.compare_runs(gpu, work / "cpu500", work / "gpu500-crops", work / "cpu500-crops")
    assert not res["ok"]
    assert res["flips"] == 1 and res["n_outliers"] == 1
    assert res["outliers"][0][1] == pytest.approx(3 * 2**0.5, abs=0.02)
    assert any("one side only" in p for p in res["problems"])


def test_gpu_samples_parse_nvidia_smi_csv(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text(
        "2026/12/01 10:00:00.000, 500, 0\n2026/12/01 10:00:00.250, 9500, 87\n"
        "2026/12/01 10:00:00.500, 12500, 95\n2026/12/01 10:00:00.750, 125",  # the last line cut by the kill
        encoding="utf-8",
    )
    s = gpu_check.gpu_samples(p)
    assert s == {
        "samples": 3,
        "memory_peak_mib": 12500.0,
        "memory_peak_over_idle_mib": 12000.0,
        "util_min": 0.0,
        "util_median": 87.0,
        "util_max": 95.0,
    }


def test_script_refuses_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --nope" in proc.stderr
