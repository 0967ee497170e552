"""The parts of :class:`packer.layout.DatasetWriter`, one job each.

- :mod:`~packer.writer.names`: the files a pack owns in its folder (streamed partials, outputs, state).
- :mod:`~packer.writer.folder`: one writer per folder (lock) and what the folder holds at open (fresh, an
  unfinished pack, a finished one, or something to refuse).
- :mod:`~packer.writer.journal`: the streamed partial files and the state file that says how much of them is
  committed; reopening them on resume.
- :mod:`~packer.writer.records`: the bytes an identity adds to each streamed file, face2rec2's meta records, the
  flat layout's shuffle.
- :mod:`~packer.writer.report`: ``report.json`` and the summary read back from it.
"""
