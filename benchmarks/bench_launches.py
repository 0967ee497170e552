"""Device-op budget, measured on CPU: torch ops per photo and host syncs per batch of ``FaceAligner.align``.

A GPU run is bounded by how many kernels each photo launches and by how often the host waits for the device.
Both can be counted without a GPU: ``FaceAligner(tuning="cuda")`` runs on CPU with the CUDA work sizes (big atlas
pages, one-gather pyramid resampling, big crop batches) and the CUDA code branches (torch summed-area tables, no
per-thread workspace), so every op a GPU would launch is issued here too.

What is counted, per ``align()`` of a batch of small photos (the shipped face photos resized to a random long side
in [--min-side, --max-side] px, so a 1024-photo batch runs in seconds; op counts barely depend on photo size):

- **device ops** (``torch.profiler``, CPU activities): aten ops that would launch a kernel, counted at the innermost
  level (a composite op such as ``aten::linear`` counts as the kernels it calls, ``aten::addmm``), excluding
  ops that only make views or allocate: %(excluded)s; and ops whose first input is an empty tensor (CUDA launches
  nothing for them). Counted: everything else, including copies (``copy_``,
  ``clone``, ``contiguous``), fills (``zero_``, ``fill_``) and the CPU-side scalar reads (``_local_scalar_dense``).
  CPU kernels can differ from CUDA's in how they split work (e.g. a convolution with bias is one CPU op and one or
  two CUDA kernels), so the counts are an estimate of launches, accurate to a few percent.
- **host syncs** (a ``TorchFunctionMode`` that sees every torch call from Python): reads of device data by the host
  (``item``/``int``/``float``/``bool`` of a tensor, ``tolist``, ``numpy``, ``cpu``), and ops whose output size
  depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``torch.equal``,
  ``repeat_interleave`` without ``output_size``): each makes the host wait for the device on CUDA.
- **host→device copies**: tensors built on the host (``torch.tensor``/``as_tensor`` of Python data with a
  ``device=``, or ``torch.from_numpy(...)``/host tensors moved with ``.to(device)``). They do not wait for the
  device's queue but each is a separate transfer. Host-side work (tensors that never leave the host) is not counted.

Usage: python -m benchmarks.bench_launches [--batches 64 256 1024] [--tuning cuda|cpu] [--top 15] [--write-results]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import time
import traceback

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from benchmarks.common import machine, write_section
from gpu_align import FaceAligner
from gpu_align.demo import photos

# Ops that make views, reshape metadata or allocate without writing: no kernel on CUDA.
_NO_KERNEL_NAMES = (
    "view alias as_strided slice select expand expand_as permute t transpose unsqueeze squeeze detach "
    "_reshape_alias reshape _unsafe_view view_as flatten unflatten unbind split split_with_sizes chunk narrow "
    "empty empty_like empty_strided new_empty new_empty_strided resize_ set_ lift_fresh result_type size stride "
    "numel dim is_nonzero to _to_copy type_as contiguous movedim broadcast_to unfold diagonal real imag "
    "_nested_tensor_from_mask_left_aligned"
)
NO_KERNEL = frozenset("aten::" + n for n in _NO_KERNEL_NAMES.split())
# ``aten::to``/``_to_copy``/``contiguous``/``is_nonzero`` are wrappers: the copy or read they do is counted
# (``copy_``, ``_local_scalar_dense``) and a no-op conversion counts nothing.


def count_device_ops(prof) -> collections.Counter:
    """Innermost kernel-launching aten ops of a profile (see the module docstring), by name."""
    counts: collections.Counter = collections.Counter()

    def visit(e) -> bool:  # whether e or an op below it is a kernel (launched or, on an empty tensor, not)
        below = [visit(c) for c in e.cpu_children]
        if any(below):
            return True
        if not e.name.startswith("aten::") or e.name in NO_KERNEL:
            return False
        shapes = e.input_shapes
        if not (shapes and shapes[0] and isinstance(shapes[0][0], int) and math.prod(shapes[0]) == 0):
            counts[e.name] += 1  # else an op on an empty tensor: CUDA returns before the launch
        return True

    for e in prof.events():
        if e.cpu_parent is None:
            visit(e)
    return counts


_HOST = "_bench_launches_host"  # attribute marking a tensor that lives on the host in a GPU run
_READS = {"tolist", "numpy", "cpu", "item", "__int__", "__float__", "__bool__", "__index__", "__format__"}
_DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "nonzero_static"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _tag(x) -> None:
    for t in _tensors(x):
        with contextlib.suppress(AttributeError, RuntimeError):  # some tensors take no attributes
            setattr(t, _HOST, True)


def _has_device_arg(args, kwargs) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[1:])


class SyncCounter(TorchFunctionMode):
    """Counts, by call site kind, what would make a CUDA host wait or copy (see the module docstring)."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.h2d: collections.Counter = collections.Counter()
        self.where = where
        self.sites: collections.Counter = collections.Counter()

    def _site(self, kind: str) -> str:
        if self.where:  # innermost caller in the project's code
            for fr in reversed(traceback.extract_stack()[:-2]):
                if "/gpu_align/" in fr.filename:
                    self.sites[f"{kind} at {fr.filename.rsplit('/', 1)[-1]}:{fr.lineno} ({fr.line})"] += 1
                    break
        return kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        out = func(*args, **kwargs)
        ts = list(_tensors(list(args) + list(kwargs.values())))
        if name in ("tensor", "as_tensor", "asarray") and not (args and isinstance(args[0], torch.Tensor)):
            if "device" in kwargs:
                self.h2d[self._site(f"torch.{name}(data, device=...)")] += 1
            else:
                _tag(out)
            return out
        if name in ("to", "cuda") and ts and _is_host(ts[0]):
            if _has_device_arg(args, kwargs) or name == "cuda":
                self.h2d[self._site("host tensor .to(device)")] += 1
            else:
                _tag(out)
            return out
        device_args = [t for t in ts if not _is_host(t)]
        if ts and not device_args:  # host-only work
            _tag(out)
            return out
        if name in _READS and device_args:
            self.syncs[self._site(f"read: {name}")] += 1
        elif name in _DATA_SHAPED:
            self.syncs[self._site(f"data-dependent size: {name}")] += 1
        elif (
            name == "repeat_interleave"
            and "output_size" not in kwargs
            and any(isinstance(a, torch.Tensor) for a in args[1:2])
        ):
            self.syncs[self._site("data-dependent size: repeat_interleave")] += 1
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            idx = args[1] if len(args) > 1 else None
            if any(t.dtype == torch.bool for t in _tensors(idx)):
                self.syncs[self._site(f"data-dependent size: bool mask {name}")] += 1
        return out


def make_photos(n: int, lo: int, hi: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` shipped face photos resized to a random long side in [lo, hi] px, (H, W, 3) uint8 tensors."""
    rng = np.random.default_rng(seed)
    names = list(photos.available(photos.FACE_PHOTOS))
    sources = [Image.fromarray(photos.load_rgb(name)) for name in names]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        s = int(rng.integers(lo, hi + 1)) / max(src.size)
        im = src.resize((max(1, round(src.width * s)), max(1, round(src.height * s))), Image.BILINEAR)
        out.append(torch.from_numpy(np.array(im)))
    return out


def measure(aligner: FaceAligner, images: list[torch.Tensor], where: bool = False) -> dict:
    """Ops, syncs and host→device copies of one ``aligner.align(images)`` (``where``: also their call sites)."""
    counter = SyncCounter(where)
    real_from_numpy = torch.from_numpy

    def from_numpy(a):  # not a torch function (no mode sees it): tag its result as host data
        t = real_from_numpy(a)
        _tag(t)
        return t

    torch.from_numpy = from_numpy
    try:
        t0 = time.perf_counter()
        with (
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof,
            counter,
        ):
            res = aligner.align(images)
        seconds = time.perf_counter() - t0
    finally:
        torch.from_numpy = real_from_numpy
    ops = count_device_ops(prof)
    return {
        "ops": ops,
        "syncs": counter.syncs,
        "h2d": counter.h2d,
        "sites": counter.sites,
        "found": int(res.found.sum()),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes (default 64 256 1024)")
    ap.add_argument("--tuning", default="cuda", choices=("cuda", "cpu"), help="work sizes and code paths (cuda)")
    ap.add_argument("--min-side", type=int, default=120, help="smallest photo long side (px)")
    ap.add_argument("--max-side", type=int, default=320, help="largest photo long side (px)")
    ap.add_argument("--refine", action="store_true", help="with the experimental O-Net landmark refinement")
    ap.add_argument("--top", type=int, default=0, help="list the N most frequent ops and every sync kind")
    ap.add_argument("--where", action="store_true", help="list the call sites of syncs and copies")
    ap.add_argument("--write-results", action="store_true", help="update 'Device ops' in benchmarks/RESULTS.md")
    a = ap.parse_args()

    aligner = FaceAligner(tuning=a.tuning, refine=a.refine)
    images = make_photos(max(a.batches), a.min_side, a.max_side)
    aligner.align(images[:16])  # warm-up (weights, lazy inits)
    kpx = np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e3
    print(f"tuning {a.tuning!r}, photos long side {a.min_side}-{a.max_side} px ({kpx:.0f} kpx mean)")
    rows = [
        "| batch | device ops / photo | host syncs / batch | host→device copies / batch | faces found |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in a.batches:
        m = measure(aligner, images[:b], a.where)
        n_ops, n_sync, n_h2d = sum(m["ops"].values()), sum(m["syncs"].values()), sum(m["h2d"].values())
        print(
            f"batch {b:5d}: {n_ops / b:6.1f} device ops/photo ({n_ops} in all), {n_sync:4d} host syncs/batch, "
            f"{n_h2d:4d} host→device copies/batch, found {m['found']}/{b}, {m['seconds']:.1f} s"
        )
        rows.append(f"| {b} | {n_ops / b:.1f} | {n_sync} | {n_h2d} | {m['found']}/{b} |")
        if a.top:
            print("   ops:", ", ".join(f"{k[6:]} {v}" for k, v in m["ops"].most_common(a.top)))
            print("   syncs:", ", ".join(f"{k} {v}" for k, v in m["syncs"].most_common()))
            print("   host→device:", ", ".join(f"{k} {v}" for k, v in m["h2d"].most_common()))
        for site, k in sorted(m["sites"].items()):
            print(f"   {k:4d}  {site}")
    if a.write_results:
        flags = f" --tuning {a.tuning}" * (a.tuning != "cuda") + " --refine" * a.refine
        text = "\n".join(
            [
                f"Machine: {machine(load=False)}.",
                "",
                f"`FaceAligner(tuning={a.tuning!r}{', refine=True' * a.refine})` on CPU: the CUDA work sizes and code "
                "branches, so every op a GPU would launch is issued and counted (`torch.profiler`, innermost aten ops "
                "that are not views or allocations); host syncs = device reads by the host and data-dependent output "
                "sizes; host→device copies = host-built tensors sent to the device. Photos: the shipped face photos, "
                f"long side random in {a.min_side}–{a.max_side} px ({kpx:.0f} kpx mean).",
                "",
                *rows,
                "",
                f"Command: `python -m benchmarks.bench_launches{flags}`.",
            ]
        )
        write_section("Device ops per photo" + (f" ({a.tuning} tuning)" if a.tuning != "cuda" else ""), text)


__doc__ = __doc__ % {"excluded": ", ".join(sorted(n[6:] for n in NO_KERNEL))}

if __name__ == "__main__":
    main()
