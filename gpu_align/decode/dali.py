"""DALI decode backend: ``fn.decoders.image`` on the "mixed" (GPU) device, or on "cpu" without a GPU.

Files are read, their headers checked and their JPEG data checked for damage (a strict 1/8-scale libjpeg-turbo
decode, since DALI decodes damaged data silently) in a thread pool (``Decoder._load``: bad files never reach DALI),
then each batch is fed to a pipeline through ``fn.external_source``: the encoded bytes, and each image's global
input index as its label. The index travels through the pipeline with the image, so outputs map back to files;
batches are fed at their real size, so there is no padding to drop.

The pipeline uses DALI's dynamic executor (``exec_dynamic=True``), whose outputs are not recycled: each decoded
image is handed to torch with ``torch.from_dlpack`` (no copy, GPU memory stays on the GPU; DALI makes torch's
current stream wait for the decode), exactly as ``DALIRaggedIterator`` does for ``SPARSE_LIST_TAG`` outputs.

One undecodable file aborts a DALI run. Then the pipeline is rebuilt and the batch bisected until the bad
file(s) are isolated; an isolated file is given one try on the CPU decoder (so a file DALI cannot decode but
libjpeg-turbo/Pillow can is still used) before it is reported as corrupt. Each failed pipeline is shut down before
the next one is built (its threads and buffers do not pile up over the bisection). Out of memory is not a bad
file: the batch is halved (no file reported), and a single image that still does not fit is decoded on the CPU
(with a warning saying which ``--batch-size`` to use): a decoder message that merely reads like out of memory
(libpng's "out of memory" for a damaged chunk) then still ends as that one file's "corrupt", never as a stop.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from gpu_align.decode.base import DecodeError, Decoder, Loaded, check_jpeg_data
from gpu_align.decode.cpu import decode_bytes
from gpu_align.device import is_out_of_memory, oom_message
from packer.imageinfo import CORRUPT


def _dali_reason(error: Exception) -> str:
    """The useful line of a DALI pipeline error (its message repeats the pipeline's definition traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    lines = [ln for ln in lines if ln and "no longer valid" not in ln and not ln.startswith("Critical error")]
    return lines[0].rstrip(" :") if lines else type(error).__name__


class DaliDecoder(Decoder):
    """DALI decoder on ``device`` (CUDA: "mixed" nvImageCodec decode; CPU: DALI's "cpu" decoder).

    ``threads`` are DALI's CPU threads; file reading, header and damaged-data checks use as many more.
    ``hw_decoder_load``: share of JPEGs sent to the GPU's hardware decoder (A100/H100); ``preallocate_*_hint``:
    typical image size, so the GPU decoder allocates once. ``check_jpeg=False`` skips the damaged-data check (it
    costs ~75-85 % of a CPU decode per JPEG; damaged data is then decoded silently, unlike on the CPU backend).
    Images: ``(H, W, 3) uint8`` tensors on ``device`` (DALI-owned memory).
    """

    def __init__(
        self,
        *,
        hw_decoder_load: float = 0.65,
        preallocate_width_hint: int = 0,
        preallocate_height_hint: int = 0,
        check_jpeg: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_jpeg = check_jpeg
        self.mixed = self.device.type == "cuda"
        self.name = "dali-mixed" if self.mixed else "dali-cpu"
        self.device_id = None
        if self.mixed:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        self._decoder_args = {
            "device": "mixed" if self.mixed else "cpu",
            "adjust_orientation": True,  # EXIF orientation applied, as on every backend
            "jpeg_fancy_upsampling": True,  # libjpeg-turbo's chroma upsampling: same pixels as the CPU decoders
        }
        if self.mixed:
            self._decoder_args.update(
                hw_decoder_load=hw_decoder_load,
                preallocate_width_hint=preallocate_width_hint,
                preallocate_height_hint=preallocate_height_hint,
            )
        self.rebuilds = 0  # pipeline rebuilds after errors (for reports and tests)
        self.oom_splits = 0  # batches halved after an out-of-memory error
        self._pipe = None
        self._build()

    def _loader_threads(self) -> int:
        return self.threads  # they also run the damaged-data check on every JPEG

    def _load(self, index: int, path: str) -> Loaded:
        item = super()._load(index, path)
        if self.check_jpeg and item.reason is None and item.info.format == "JPEG":
            # DALI decodes damaged JPEG data silently (libjpeg-turbo only warns; nvJPEG says nothing): check it here
            # so that every backend calls such a file "corrupt".
            try:
                check_jpeg_data(item.data, item.info)
            except DecodeError as e:
                item.data, item.reason = None, str(e)
        return item

    def _build(self) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        self._release()  # shut the broken pipeline down before allocating a new one
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,  # batches are fed and run one at a time
            exec_dynamic=True,  # outputs stay valid after the next run: handed to torch without a copy
            seed=0,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            labels = fn.external_source(name="labels", dtype=types.INT64, ndim=1)
            images = fn.decoders.image(encoded, output_type=types.RGB, **self._decoder_args)
            pipe.set_outputs(images, labels)
        pipe.build()
        self._pipe = pipe

    def _run(self, items: list[Loaded]) -> list[tuple[int, torch.Tensor]]:
        """One pipeline run over ``items``: [(index, (H, W, 3) uint8 on self.device)]; raises on a DALI error."""
        self._feed(items)
        return self._outputs(*self._pipe.run())

    def _feed(self, items: list[Loaded]) -> None:
        self._pipe.feed_input("encoded", [np.frombuffer(x.data, dtype=np.uint8) for x in items])
        self._pipe.feed_input("labels", [np.array([x.index], dtype=np.int64) for x in items])

    def _outputs(self, images, labels) -> list[tuple[int, torch.Tensor]]:
        indices = labels.as_array().reshape(-1).tolist()
        # torch.from_dlpack passes torch's current stream; DALI inserts the wait for its decode on that stream
        ctx = torch.cuda.device(self.device_id) if self.mixed else contextlib.nullcontext()
        with ctx:
            return [(int(indices[k]), torch.from_dlpack(images[k])) for k in range(len(indices))]

    # Prefetch: the next batch's run is scheduled before the current batch is handed out (``Decoder.batches``), so
    # DALI decodes it while the caller detects the current one. One run in flight at a time (prefetch queue depth
    # 1); with ``exec_dynamic`` the handed-out outputs stay valid while the next run writes its own.
    @property
    def overlap(self) -> bool:
        # a subclass that changes how a batch runs (e.g. a test emulating a device limit) gets the synchronous
        # path, which calls its _run
        return type(self)._run is DaliDecoder._run

    def _start(self, items: list[Loaded]) -> bool:
        try:
            self._feed(items)
            self._pipe.schedule_run()
        except (RuntimeError, MemoryError):
            return False  # _collect decodes it the synchronous way
        return True

    def _collect(self, items: list[Loaded], started: bool):
        if started:
            try:
                return self._outputs(*self._pipe.outputs()), []
            except (RuntimeError, MemoryError):
                pass
            # (outside the except block, so the failed pipeline's frames are gone) a failed run leaves the pipeline
            # unusable: rebuild it, then the synchronous path retries the batch and bisects it (out of memory, bad
            # files) exactly as for a failed run()
            self.rebuilds += 1
            self._build()
        return self._decode(items)

    def _release(self) -> None:
        """Shut the current pipeline down now (its worker threads stop), not when the last reference goes.

        A failed run's exception holds the pipeline through its traceback frames; without this, every level of
        a bisection kept its failed pipeline alive (8 pipelines, 86 threads for one bad file in 64). Tensors
        already handed to torch keep their own buffers.
        """
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            shutdown = getattr(pipe, "_shutdown", None)  # what Pipeline.__del__ calls (DALI 2.4)
            if shutdown is not None:
                shutdown()

    def _decode(self, items: list[Loaded]):
        try:
            return self._run(items), []
        except (RuntimeError, MemoryError) as e:
            reason, oom = _dali_reason(e), is_out_of_memory(e)
        # Outside the except block: the exception and its traceback (the failed pipeline's frames) are gone.
        self.rebuilds += 1
        self._build()
        if oom:  # the batch's fault, not a file's: halve it, never bisect down to "corrupt" files
            if self.mixed:
                torch.cuda.empty_cache()  # torch's cached blocks back to the driver, for DALI's allocator
            if len(items) == 1:
                warnings.warn(
                    f"{oom_message('decoding', self.batch_size, self.device)}; DALI: {reason}; "
                    f"decoding {items[0].path} on the CPU",
                    stacklevel=2,
                )
            else:
                self.oom_splits += 1
        if len(items) > 1:
            mid = len(items) // 2
            left, left_failed = self._decode(items[:mid])
            right, right_failed = self._decode(items[mid:])
            return left + right, left_failed + right_failed
        return self._fallback(items[0], reason)

    def _fallback(self, item: Loaded, dali_reason: str):
        """A file DALI failed on alone: decode it on the CPU if possible, else report it as corrupt."""
        try:
            image = torch.from_numpy(decode_bytes(item.data, item.info)).to(self.device)
        except DecodeError as e:
            detail = str(e).split(": ", 1)[-1]
            if dali_reason.startswith("Failed to decode sample"):  # its sample number is within the sub-batch
                dali_reason = "failed to decode"
            return [], [(item.index, item.path, f"{CORRUPT}: {detail} (DALI: {dali_reason})")]
        return [(item.index, image)], []

    def close(self) -> None:
        super().close()
        self._release()
