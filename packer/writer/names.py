"""The files a pack owns in its folder: what ``overwrite`` and the end of a pack may remove, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

STATE_NAME = "pack.state.json"
REPORT_NAME = "report.json"
PARTIAL = ".partial"
SHUFFLED = ".shuffled.partial"
# Files appended while streaming: key -> final (or internal) name; their partials are "<name>.partial".
STREAM = {
    "rec": "train.rec",
    "idx": "train.idx",
    "lst": "train.lst",
    "skipped": "skipped.jsonl",
    "notes": "notes.jsonl",
    "groups": "groups.jsonl",
    "crc": "train.rec.crc",  # one checksum per record (packer.crcfile), read by verify
}
# The finished dataset, in rename order: report.json last, its presence marks a finished dataset.
OUTPUT_ORDER = ("train.rec", "train.idx", "train.rec.crc", "train.lst", "property", REPORT_NAME)
SHUFFLED_OUTPUTS = ("train.rec", "train.idx", "train.rec.crc", "train.lst")


def our_names(companions: Sequence[str] = ()) -> list[str]:
    """Every name a pack may leave in its folder, plus the caller's ``companions`` (and their ``.tmp``)."""
    names = [*OUTPUT_ORDER, STATE_NAME, STATE_NAME + ".tmp", "report.html", "report.html.tmp"]
    names += [n + PARTIAL for n in (*STREAM.values(), "property", REPORT_NAME)]
    names += [n + SHUFFLED for n in SHUFFLED_OUTPUTS]
    return names + [n for c in companions for n in (c, c + ".tmp")]
