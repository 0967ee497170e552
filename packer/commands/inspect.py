"""``gpu-align inspect PATH``: what a dataset (or a verification ``.bin``) holds, as text, JSON and a montage."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from packer.binfile import read_bin
from packer.cli import add_command
from packer.errors import UserError
from packer.montage import montage, save_montage
from packer.reader import DatasetReader, decode_image, image_format, image_shape

EPILOG = """\
For a dataset (folder with train.rec/train.idx, or a .rec): layout (insightface = key 0 header + identity
records, or flat), label style (scalar, or pair = [class, aligned] lists), numbers of images and identities,
images per identity (min/median/max), the key 0 header, and the first records in file order (key, flag,
label, header id, body size, decoded image format and size). A flat dataset's per-identity counts read
every record header. The label style is sampled from 17 images spread over the dataset (verify checks all).

For a verification .bin (pickle of (images, issame)): number of pairs, positives/negatives, image formats
and sizes; --montage draws the first pairs side by side with same/diff.

--montage draws one row per identity (identities spread over the dataset), up to --montage-cols images
each, captioned label/key; the output format follows the extension (.png, .jpg).

examples:
  gpu-align inspect data/faces_emore
  gpu-align inspect data/faces_emore --montage /tmp/emore.png --records 3
  gpu-align inspect data/faces_emore/lfw.bin --montage /tmp/lfw_pairs.png
  gpu-align inspect data/ds --json | jq .images_per_identity
"""


def _header_dict(h) -> dict:
    label = h.label.tolist() if h.flag else float(h.label)
    return {"flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2)}


def _image_info(body: bytes) -> dict:
    if not body:
        return {"format": None, "image_size": None}
    fmt = image_format(body)
    try:
        img = decode_image(body)
        return {"format": fmt, "image_size": [int(img.shape[0]), int(img.shape[1])]}
    except ValueError as e:
        return {"format": fmt, "image_size": None, "error": str(e)}


def inspect_dataset(path, *, records: int = 5, progress: bool = False) -> tuple[dict, DatasetReader]:
    """Summary dict of a dataset (see ``gpu-align inspect --json``) and its open reader (caller closes it)."""
    reader = DatasetReader(path)
    try:
        paths = reader.paths
        info: dict = {
            "kind": "dataset",
            "rec": str(paths.rec),
            "idx": str(paths.idx),
            "rec_bytes": reader.rec_size,
            "num_records": len(reader.keys),
            "property": None if reader.property is None else reader.property.__dict__,
            "lst_lines": None,
            "layout": reader.layout,
        }
        if paths.lst.is_file():
            with open(paths.lst, "rb") as f:
                info["lst_lines"] = sum(1 for line in f if line.strip())
        if reader.layout == "insightface":
            ranges = reader.identity_ranges()
            per_identity = np.asarray([e - s for s, e in ranges], dtype=np.int64)
        else:
            labels = reader.labels(progress=progress)
            per_identity = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
            per_identity = per_identity[per_identity > 0]
        info["label_style"] = reader.label_style
        info["num_images"] = reader.num_images
        info["num_identities"] = len(per_identity)
        info["images_per_identity"] = (
            {
                "min": int(per_identity.min()),
                "median": float(np.median(per_identity)),
                "max": int(per_identity.max()),
            }
            if len(per_identity)
            else None
        )
        info["header"] = None if reader.header is None else {"key": 0, **_header_dict(reader.header)}
        first = []
        for key in reader.keys[:records]:
            header, body = reader.read_raw(key)
            first.append({"key": key, **_header_dict(header), "body_bytes": len(body), **_image_info(body)})
        info["first_records"] = first
        return info, reader
    except BaseException:
        reader.close()
        raise


def _fmt_label(label) -> str:
    if isinstance(label, list):
        return "[" + ", ".join(f"{x:g}" for x in label) + "]"
    return f"{label:g}"


def format_dataset(info: dict) -> str:
    prop = info["property"]
    prop_s = f"property {prop['num_classes']},{prop['height']},{prop['width']}" if prop else "no property file"
    lst = f", train.lst {info['lst_lines']} lines" if info["lst_lines"] is not None else ""
    lines = [
        f"dataset      {info['rec']}",
        f"files        {Path(info['rec']).name} {info['rec_bytes']:,} bytes, {Path(info['idx']).name} "
        f"{info['num_records']} keys, {prop_s}{lst}",
    ]
    n, k = info["num_images"], info["num_identities"]
    if info["layout"] == "insightface":
        lines.append(
            f"layout       insightface: key 0 header, images are keys 1..{n}, identity records {n + 1}..{n + k}"
        )
    else:
        lines.append("layout       flat: every record is an image (no header or identity records)")
    style = {
        "scalar": "scalar (flag 0: the class is the header label)",
        "pair": "pair (label list, class first: face2rec2's [class, aligned])",
        "mixed": "mixed (scalar and list labels; run verify)",
        "none": "none (no images)",
    }[info["label_style"]]
    lines.append(f"label style  {style}")
    lines.append(f"images       {n}")
    ipi = info["images_per_identity"]
    ipi_s = f"  (images per identity: min {ipi['min']}, median {ipi['median']:g}, max {ipi['max']})" if ipi else ""
    lines.append(f"identities   {k}{ipi_s}")
    h = info["header"]
    if h:
        lines.append(
            f"header       key 0: flag {h['flag']}, label {_fmt_label(h['label'])}, id {h['id']}, id2 {h['id2']}"
        )
    else:
        lines.append("header       none (no key 0 meta record)")
    if info["first_records"]:
        lines.append("first records (file order):")
        lines.append(f"  {'key':>8} {'flag':>4}  {'label':<14} {'id':>8} {'body':>10}  image")
        for r in info["first_records"]:
            if r["image_size"]:
                img = f"{r['format']} {r['image_size'][0]}x{r['image_size'][1]}"
            elif r.get("error"):
                img = f"undecodable: {r['error']}"
            else:
                img = "-" if not r["body_bytes"] else f"{r['format'] or 'unknown'}"
            lines.append(
                f"  {r['key']:>8} {r['flag']:>4}  {_fmt_label(r['label']):<14} {r['id']:>8} "
                f"{r['body_bytes']:>8,} B  {img}"
            )
    return "\n".join(lines)


def dataset_montage(reader: DatasetReader, rows: int, cols: int) -> np.ndarray:
    """One row per identity (``rows`` identities spread over the dataset), up to ``cols`` images each."""
    if reader.layout == "insightface":
        ranges = reader.identity_ranges() or []
        groups = [(c, list(range(s, min(e, s + cols)))) for c, (s, e) in enumerate(ranges)]
    else:
        keys = np.asarray(reader.image_keys())
        labels = reader.labels()
        order = np.argsort(labels, kind="stable")
        uniq, starts = np.unique(labels[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        groups = [
            (int(c), keys[order[s : min(e, s + cols)]].tolist()) for c, s, e in zip(uniq, starts, ends, strict=True)
        ]
    if not groups:
        raise UserError("the dataset has no images to draw")
    n = min(rows, len(groups))
    pick = sorted({round(i * (len(groups) - 1) / max(1, n - 1)) for i in range(n)})
    cells = []
    for gi in pick:
        row = []
        for key in groups[gi][1]:
            rec = reader.read(key)
            try:
                img = decode_image(rec.body)
            except ValueError:
                img = None
            row.append(([img], f"{rec.label}/k{key}"))
        row += [([np.full((8, 8, 3), 255, np.uint8)], "")] * (cols - len(row))  # blank cells keep rows aligned
        cells += row
    return montage(cells, cols=cols)


def inspect_bin(path) -> tuple[dict, list[bytes], list[bool]]:
    images, issame = read_bin(path)
    formats: Counter = Counter()
    sizes: Counter = Counter()
    bad = 0
    for body in images:
        formats[image_format(body) or "unknown"] += 1
        try:
            h, w = image_shape(body)
            sizes[f"{h}x{w}"] += 1
        except ValueError:
            bad += 1
    info = {
        "kind": "bin",
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "pairs": len(issame),
        "positives": int(sum(issame)),
        "negatives": len(issame) - int(sum(issame)),
        "images": len(images),
        "formats": dict(formats),
        "image_sizes": dict(sizes),
        "unreadable_images": bad,
    }
    return info, images, issame


def format_bin(info: dict) -> str:
    sizes = ", ".join(f"{s} ({n})" for s, n in info["image_sizes"].items()) or "-"
    formats = ", ".join(f"{f} {n}" for f, n in info["formats"].items())
    lines = [
        f"verification set  {info['path']} ({info['bytes']:,} bytes)",
        f"pairs             {info['pairs']} ({info['positives']} same, {info['negatives']} different)",
        f"images            {info['images']} ({formats}), image sizes {sizes}",
    ]
    if info["unreadable_images"]:
        lines.append(f"unreadable        {info['unreadable_images']} images")
    return "\n".join(lines)


def bin_montage(images: list[bytes], issame: list[bool], rows: int, cols: int) -> np.ndarray:
    per_row = max(1, cols // 2)
    cells = []
    for i in range(min(len(issame), rows * per_row)):
        pair = []
        for body in images[2 * i : 2 * i + 2]:
            try:
                pair.append(decode_image(body))
            except ValueError:
                pair.append(None)
        cells.append((pair, f"#{i} {'same' if issame[i] else 'diff'}"))
    if not cells:
        raise UserError("the .bin has no pairs to draw")
    return montage(cells, cols=per_row)


def _run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.suffix == ".bin" and path.is_file():
        info, images, issame = inspect_bin(path)
        print(json.dumps(info, indent=2) if args.json else format_bin(info))
        if args.montage:
            save_montage(args.montage, bin_montage(images, issame, args.montage_rows, args.montage_cols))
            if not args.json:
                print(f"montage      {args.montage}")
        return 0
    info, reader = inspect_dataset(path, records=args.records, progress=not args.quiet and not args.json)
    with reader:
        print(json.dumps(info, indent=2) if args.json else format_dataset(info))
        if args.montage:
            save_montage(args.montage, dataset_montage(reader, args.montage_rows, args.montage_cols))
            if not args.json:
                print(f"montage      {args.montage}")
    return 0


HELP = "show what a dataset or a verification .bin holds (--montage: picture of samples)"
DESCRIPTION = (
    "Describe a RecordIO face dataset (layout, labels, counts, header, first records) or an "
    "InsightFace verification .bin (pairs, positives/negatives, image size)."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "inspect", HELP, DESCRIPTION, EPILOG)
    p.add_argument("path", metavar="PATH", help="dataset folder, .rec, or verification .bin")
    p.add_argument("--records", type=int, default=5, metavar="N", help="first records to list (default 5)")
    p.add_argument("--montage", metavar="OUT.png", help="draw sample faces (or the first pairs) into this image")
    p.add_argument("--montage-rows", type=int, default=8, metavar="N", help="identities (rows) in the montage")
    p.add_argument("--montage-cols", type=int, default=8, metavar="N", help="images per row in the montage")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
