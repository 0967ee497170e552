"""Merge dataset shards into one dataset, or convert one to the flat layout (``merge`` and ``to-flat``).

Both stream the stored image bytes (never re-encoded) from :class:`~packer.reader.DatasetReader` into a
:class:`~packer.layout.DatasetWriter`, one identity at a time, so keys and labels are renumbered contiguously,
identities stay whole, and an interrupted run can be resumed.

Identities across shards: by default every shard's classes are distinct identities (shard 0's classes first, then
shard 1's, ...): class numbers and even folder names say nothing about who a person is across independently built
shards. With ``by_name`` the identity is the image's folder name as recorded in the shard's ``train.lst``
(``.../<identity>/<image>.jpg``); classes with the same name in several shards become one identity, and
identities are ordered by name (as ``gpu-align lst`` orders folders).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from packer.errors import UserError
from packer.layout import DatasetWriter, PackItem, WriteSummary
from packer.lst import LstEntry, read_lst
from packer.reader import DatasetReader, image_shape
from packer.verify import check_index_or_refuse

__all__ = ["MergeSource", "merge_datasets"]


@dataclass
class MergeSource:
    """One input shard: its reader, each class's image keys (key order), and its train.lst entries (or None)."""

    reader: DatasetReader
    classes: list[list[int]]
    lst: dict[int, LstEntry] | None  # image key -> its train.lst entry

    def class_name(self, c: int) -> str:
        """The identity folder name of class ``c`` from train.lst paths; UserError if unknown or ambiguous."""
        if self.lst is None:
            raise UserError(
                f"{self.reader.paths.dir}: --by-name needs a train.lst with one line per image "
                "(its paths name each identity's folder)"
            )
        names = {PurePath(self.lst[k].path).parent.name for k in self.classes[c]}
        if len(names) != 1 or "" in names:
            raise UserError(
                f"{self.reader.paths.lst}: the images of class {c} come from folders {sorted(names)!r}, "
                "so --by-name cannot tell which identity it is"
            )
        return names.pop()


def _classes(reader: DatasetReader, progress: bool) -> list[list[int]]:
    """Image keys per class: identity ranges (insightface layout) or the records grouped by label (flat)."""
    ranges = reader.identity_ranges()
    if ranges is not None:
        return [list(range(s, e)) for s, e in ranges]
    keys = np.asarray(reader.image_keys(), dtype=np.int64)
    labels = reader.labels(progress=progress)
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return [keys[order[s:e]].tolist() for s, e in zip(starts, ends, strict=True)] if len(uniq) else []


def _lst_entries(reader: DatasetReader) -> dict[int, LstEntry] | None:
    """train.lst line i belongs to the i-th image key (face2rec2 and our writer write both in one order)."""
    path = reader.paths.lst
    if not path.is_file():
        return None
    try:
        entries = list(read_lst(path, require_grouped=False))
    except UserError:
        return None
    keys = reader.image_keys()
    if len(entries) != len(keys):
        return None
    return dict(zip(keys, entries, strict=True))


def _image_size(reader: DatasetReader) -> tuple[int, int]:
    if reader.property is not None:
        return reader.property.height, reader.property.width
    for key in reader.image_keys()[:1]:
        return image_shape(reader.read(key).body)
    return (112, 112)


def _fingerprint(reader: DatasetReader) -> dict:
    h = hashlib.sha256()
    with open(reader.paths.idx, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"rec": str(reader.paths.rec.resolve()), "rec_bytes": reader.rec_size, "idx_sha256": h.hexdigest()}


def _plan(sources: list[MergeSource], by_name: bool) -> list[tuple[str, list[tuple[int, int]]]]:
    """``[(group, [(source index, key), ...]), ...]`` in output order."""
    if not by_name:
        return [
            (f"{i}:{c}", [(i, k) for k in keys])
            for i, src in enumerate(sources)
            for c, keys in enumerate(src.classes)
            if keys
        ]
    joined: dict[str, list[tuple[int, int]]] = {}
    for i, src in enumerate(sources):
        for c, keys in enumerate(src.classes):
            if keys:
                joined.setdefault(src.class_name(c), []).extend((i, k) for k in keys)
    return sorted(joined.items())


def _items(sources: list[MergeSource], plan, skip: int) -> Iterator[PackItem]:
    n = 0
    for group, members in plan:
        for i, key in members:
            n += 1
            if n <= skip:  # written by the interrupted run (whole identities): not even read
                continue
            src = sources[i]
            rec = src.reader.read(key)
            lst = src.lst[key] if src.lst is not None else None
            source = f"{src.reader.paths.rec}#{key}"
            if rec.body:
                yield PackItem(group=group, body=rec.body, lst=lst, source=source)
            else:
                yield PackItem(group=group, body=None, lst=lst, source=source, skip_reason="empty image record")


def merge_datasets(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    layout: str = "insightface",
    label_style: str = "scalar",
    by_name: bool = False,
    shuffle_seed: int | None = None,
    min_images: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    command: str = "merge",
    force: bool = False,
) -> tuple[WriteSummary, list[str]]:
    """Merge the datasets ``inputs`` (folders or .rec files) into ``out``; returns the writer's summary and notes.

    Keys and labels are renumbered (labels 0..C-1 in output order), each identity's images stay together and
    their stored bytes are copied as-is. ``train.lst`` is written when every input has one (one line per
    image); its lines keep their paths and get the new labels. See the module doc for ``by_name``.

    Each input's index is checked first (:func:`packer.verify.check_index_or_refuse`: the rules of ``verify`` on the
    .idx, layout and labels); a problem is a UserError unless ``force``.
    """
    if not inputs:
        raise UserError("no input datasets")
    out_path = Path(out).resolve()
    notes: list[str] = []
    readers: list[DatasetReader] = []
    try:
        verb = "merge" if command == "merge" else "convert"
        for p in inputs:
            notes += check_index_or_refuse(p, force=force, verb=verb)
            reader = DatasetReader(p)
            readers.append(reader)
            if reader.paths.dir.resolve() == out_path:
                raise UserError(f"the output folder {out} is also an input; write the result somewhere else")
        if len({r.paths.rec.resolve() for r in readers}) != len(readers):
            raise UserError("the same dataset is given twice")
        sizes = {_image_size(r) for r in readers}
        if len(sizes) > 1:
            listed = ", ".join(f"{r.paths.dir}: {h}x{w}" for r in readers for h, w in [_image_size(r)])
            raise UserError(f"the inputs hold images of different sizes ({listed}); merge same-size crops only")
        sources = [MergeSource(r, _classes(r, progress), _lst_entries(r)) for r in readers]
        for r in readers:
            if r.label_style == "mixed":
                notes.append(f"{r.paths.dir} mixes scalar and list labels; the output uses {label_style} labels")
        write_lst = all(s.lst is not None for s in sources)
        if not write_lst:
            missing = [str(s.reader.paths.dir) for s in sources if s.lst is None]
            notes.append(f"no train.lst written: no train.lst with one line per image in {', '.join(missing)}")
        plan = _plan(sources, by_name)
        if by_name:
            distinct = sum(len(s.classes) for s in sources)
            notes.append(f"--by-name: {distinct} input classes joined into {len(plan)} identities by folder name")
        config = {
            "command": command,
            "inputs": [_fingerprint(r) for r in readers],
            "by_name": by_name,
        }
        total = sum(len(m) for _, m in plan)
        writer = DatasetWriter(
            out,
            layout=layout,
            label_style=label_style,
            image_size=sizes.pop(),
            min_images=min_images,
            shuffle_seed=shuffle_seed,
            resume=resume,
            overwrite=overwrite,
            write_lst=write_lst,
            config=config,
        )
        from tqdm import tqdm

        with writer, tqdm(total=total, initial=writer.done, unit="img", desc=command, disable=not progress) as bar:
            for item in _items(sources, plan, writer.done):
                writer.add(item)
                bar.update()
            summary = writer.close()
        return summary, notes
    finally:
        for r in readers:
            r.close()
