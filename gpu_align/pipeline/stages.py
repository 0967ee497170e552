"""``gpu-align run``: scan → decode → detect → warp → (packer process) encode + write, resumable.

The main process owns the device: it decodes a batch (DALI on the GPU, or CPU threads), detects faces with the
batched MTCNN, warps the selected face of every photo in one batched call and copies the ``(F, S, S, 3)`` uint8
crops to the host. A separate packer process (:mod:`packer.channel`) encodes JPEGs and writes the dataset; the bounded
queue between the two is the back-pressure. Data flows one way; nothing here reaches back upstream.

Determinism and resume: decode batches are cut at multiples of ``batch_size`` of the input list. A resumed run
restarts at the batch that holds the first unwritten input and drops the inputs already written, so every photo is
detected in exactly the batch it had in an uninterrupted run: same detections, same crops, same bytes.
Landmarks are rounded to 1/100 px (what ``train.lst`` holds) before the similarity fit, so ``gpu-align pack`` of the
written ``train.lst`` rebuilds the same crops without detecting again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_align.decode import make_decoder
from gpu_align.pipeline.align_stage import AlignStage, PendingBatch
from gpu_align.pipeline.options import RunOptions, RunResult, StageTimes, check_options, resolve_device
from gpu_align.pipeline.report import input_config, run_report
from gpu_align.pipeline.resume import INPUTS_NAME, check_inputs, remove_inputs, write_inputs
from gpu_align.scan import InputItem, Source, decode_items, scan_source
from packer.channel import PackerClient, WriterSettings
from packer.layout import STATE_NAME
from packer.report_html import write_report_html_or_warn

__all__ = ["Progress", "run", "scan_inputs"]

# ``progress(done, total, counts)``: inputs handled so far (a resume's skipped ones included) of ``total``, and this
# invocation's counts (found/center/missed/failed). Called once when the writer is open, then after every batch.
Progress = Callable[[int, int, dict[str, int]], None]


def scan_inputs(opts: RunOptions) -> Source:
    """The inputs of a run with ``opts``, in packing order: ``--shard`` and ``--limit`` applied, the CSVs matched."""
    return scan_source(
        opts.src,
        min_images=opts.min_images,
        shard=opts.shard,
        limit=opts.limit,
        lst_root=opts.lst_root,
        landmarks_csv=opts.landmarks_csv,
        boxes_csv=opts.boxes_csv,
    )


def _start_packer(opts: RunOptions, source: Source, fingerprint: str) -> PackerClient:
    """The packer process for ``opts``: its writer settings, JPEG encode and queue bound."""
    writer = WriterSettings(
        out_dir=opts.out,
        layout=opts.layout,
        label_style=opts.label_style,
        image_size=opts.image_size,
        min_images=opts.min_images,
        shuffle_seed=opts.shuffle,
        resume=opts.resume,
        overwrite=opts.overwrite,
        config=input_config(opts, source, fingerprint),
        companions=(INPUTS_NAME,),
    )
    # JPEG encode threads: the caller's (a Ray worker's share of its node), else half the cores, at most 8
    threads = opts.packer_threads or min(8, max(1, (os.cpu_count() or 1) // 2))
    return PackerClient(
        writer, quality=opts.quality, save_crops=opts.save_crops, threads=threads, queue_batches=opts.queue_batches
    )


def _progress(opts: RunOptions, total: int, initial: int):
    """The progress bar counts this invocation's work only (``total - initial``), so its rate and ETA are this
    run's: with ``initial=done`` a resume's first ETA would mix in inputs that the interrupted run did."""
    from tqdm import tqdm

    return tqdm(
        total=total - initial,
        unit="img",
        desc=f"aligning (resumed at {initial:,} of {total:,})" if initial else "aligning",
        disable=opts.quiet,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )


def _align_all(
    opts: RunOptions,
    items: list[InputItem],
    done: int,
    decoder: Any,
    aligner: AlignStage,
    packer: PackerClient,
    times: StageTimes,
    counts: dict[str, int],
    progress: Progress | None = None,
) -> int:
    """Decode, align and send every input from ``done`` on; returns how many were sent.

    One batch in flight: batch N+1 is decoded and started (queued on the device) before batch N's message is
    finished and sent, so on CUDA the warp and host copy of a batch overlap the host's work on the one before.
    Messages still go out in input order.
    """
    if done >= len(items):
        return 0
    start = (done // opts.batch_size) * opts.batch_size  # restart at the batch boundary: the same batches
    processed = 0
    with _progress(opts, len(items), done) as bar:

        def send(pending: PendingBatch) -> None:
            nonlocal processed
            msg, c = pending.finish()
            for k in counts:
                counts[k] += c[k]
            if not msg.items:
                return
            times.queue_wait += packer.send(msg)
            processed += len(msg.items)
            bar.update(len(msg.items))
            bar.set_postfix(
                faces=counts["found"], missed=counts["missed"] + counts["center"], bad=counts["failed"], refresh=False
            )
            if progress is not None:
                progress(done + processed, len(items), dict(counts))

        batches = decoder.batches(decode_items(items[start:]))  # archive members carry their bytes
        in_flight: PendingBatch | None = None
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            times.decode += time.perf_counter() - t0
            if batch is None:
                break
            packer.check()
            started = aligner.start(batch, skip_below=done)
            if in_flight is not None:
                send(in_flight)
            in_flight = started
        if in_flight is not None:
            send(in_flight)
        return processed


def run(opts: RunOptions, *, source: Source | None = None, progress: Progress | None = None) -> RunResult:
    """Run the whole pipeline; returns what it did. Raises :class:`UserError` for anything the user can fix.

    Ctrl-C (KeyboardInterrupt) stops cleanly: the packer stops at its next input and keeps everything committed
    for ``resume``, and the KeyboardInterrupt is re-raised (``gpu-align run`` then prints how to continue).

    ``source``: the inputs already scanned (what ``scan_source`` returns for ``opts``), so that a driver that cut
    one scan into shards (:mod:`gpu_align.scale`) does not make every shard scan the whole tree again.
    ``progress``: see :data:`Progress`; a KeyboardInterrupt raised in it stops the run like Ctrl-C (how a Ray
    worker is asked to stop cleanly).
    """
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    check_options(opts, device)
    times = StageTimes()
    # scan: the inputs, fixed (and checked against an interrupted run's) before anything is written
    if source is None:
        source = scan_inputs(opts)
    if not opts.quiet:
        for m in source.csv:  # how --landmarks-csv / --boxes-csv met the photos (details in report.json)
            print(f"gpu-align: {m.summary()}", file=sys.stderr)
    records = source.input_records()
    fingerprint = source.fingerprint(records)
    out = Path(opts.out)
    known = opts.resume and check_inputs(out, fingerprint, records)
    times.scan = time.perf_counter() - t_start
    items = source.items
    # detect + warp, and decode: models first, so a setting they reject (e.g. --fp16 on CPU) fails before DIR
    # is touched
    aligner = AlignStage(opts, device, items, times)
    decoder = make_decoder(opts.decoder, device=device, threads=opts.threads, batch_size=opts.batch_size)
    counts = dict(found=0, center=0, missed=0, failed=0)
    try:
        packer = _start_packer(opts, source, fingerprint)  # pack: encode + write, in its own process
        try:
            done = packer.ready()
            if not known and (out / STATE_NAME).is_file():  # unfinished from here on: keep the per-input detail
                write_inputs(out, fingerprint, records)
            if progress is not None:
                progress(done, len(items), dict(counts))
            processed = _align_all(opts, items, done, decoder, aligner, packer, times, counts, progress)
            extra = run_report(opts, device, decoder, source, done, processed, counts, times, t_start)
            finished = packer.finish(extra)
        except BaseException:  # Ctrl-C included: the packer keeps everything committed, resumable
            packer.abort()
            raise
    finally:
        decoder.close()
    remove_inputs(out)
    if opts.report_html:
        write_report_html_or_warn(out)
    return RunResult(
        out_dir=Path(opts.out),
        inputs=len(items),
        processed=processed,
        found=counts["found"],
        center=counts["center"],
        missed=counts["missed"],
        failed=counts["failed"],
        seconds=extra["run"]["this_invocation"]["seconds"],  # the report's number: printed and reported agree
        times=times,
        packer=finished.stats,
        report=finished.report,
    )
