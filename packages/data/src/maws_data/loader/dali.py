"""The DALI backend of `maws_data.loader`: JPEG decode + crop/resize + normalise in a DALI pipeline.

Imported only when the loader's backend is "dali" (DALI is a heavy optional import). It depends on the
loader's index, plan and reader, never on the loader itself.

Remote shards (`s3://`, `http://`): DALI never opens a shard itself. The JPEG bytes are read on the
host by the same reader as the CPU backend (`reader.ShardFiles`: local `pread`, or ranged GETs with
retries for remote tars) and handed to the pipeline as encoded bytes, so DALI decodes remote shards
exactly like local ones; only the reads differ.

Why `fn.external_source` and not `fn.readers.webdataset`: the DALI reader splits the dataset by
contiguous sample ranges per `shard_id`, pads ranks to equal length with repeated samples and
shuffles with a buffer, so it can give neither a seed+epoch sample permutation that is the same
for both backends nor an exact mid-epoch resume. Instead the loader's epoch plan (sample ids per
batch) is read on the host -- one `pread` per JPEG at the offset in the shard's sidecar, on a small
thread pool -- and fed to the pipeline as encoded bytes. The crop box and flip
of every sample come from the same function as the Pillow backend (`samples.geometry`, vectorised over
the batch, a function of seed, epoch and sample id), so both backends produce the same crops. The
host side of batch i+1 is prepared on a background thread while DALI works on batch i.

One pipeline serves the whole run: its feed runs on from the end of an epoch into the next epoch's
plan, so DALI's prefetch at an epoch's end already decodes the next epoch's first batches and
nothing is rebuilt or refilled between epochs. The pipeline is rebuilt only when the caller asks for
a batch other than the one it has in flight (a resumed position, a skipped or replayed epoch) and
after a batch that failed to decode.

Pipeline per batch:
    encoded JPEG bytes (host)  -> fn.decoders.image   device "mixed" (nvJPEG, A100/H100/H200 hardware
                                                       JPEG decoder) with CUDA, "cpu" (libjpeg-turbo,
                                                       device_id=None) without
                               -> fn.resize            the crop box as an absolute ROI, to S x S,
                                                       bicubic, antialiased (one op: crop + resize)
                               -> fn.crop_mirror_normalize  flip, ImageNet mean/std, float32 CHW
Images come back as torch tensors on cuda:<device_id> ("mixed") or on the CPU.

Bad data: unreadable bytes (short read, not a JPEG, no end marker) are replaced on the host before
DALI sees them. A JPEG that DALI fails to decode fails the whole batch: the batch's samples are then
decoded one by one with Pillow, the broken ones are marked bad, the pipeline is rebuilt and the
batch re-run with them replaced (same policy as the Pillow backend: first good sample of the batch).
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from maws_data.loader.buffers import Batch, BufferPool
from maws_data.loader.config import LoaderConfig
from maws_data.loader.reader import SampleError, ShardFiles
from maws_data.loader.samples import BatchSource, geometry
from maws_data.transforms import IMAGENET_MEAN, IMAGENET_STD

_LIVE: weakref.WeakSet[DaliBatches] = weakref.WeakSet()
_INHERITED: list = []  # in a forked child: the parent's pipelines, held so they are never destroyed there


def _keep_inherited_pipelines() -> None:
    """In a child forked while a pipeline is alive (e.g. the DataLoader workers of another loader in
    the same training process), DALI's threads do not exist: destroying the inherited pipeline there
    (garbage collection) joins threads that are not there and crashes the child with SIGSEGV. The
    child never uses it, so it keeps it alive until it exits."""
    for batches in list(_LIVE):
        _INHERITED.append((batches._pipe, batches._feeder))
        batches._pipe = batches._feeder = None


os.register_at_fork(after_in_child=_keep_inherited_pipelines)


def dali_device_id(cfg: LoaderConfig) -> int | None:
    """CUDA device for "mixed" decoding, or None for the CPU pipeline."""
    if cfg.dali_device == "cpu" or (cfg.dali_device == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("dali_device='gpu' but CUDA is not available")
    return torch.cuda.current_device()


class DaliBatches:
    """Runs the loader's plan through a DALI pipeline; `batches()` yields `Batch`es in plan order."""

    def __init__(self, cfg: LoaderConfig, source: BatchSource):
        self.cfg, self.source = cfg, source
        self.files = ShardFiles.for_config(source.index, cfg, threads=max(1, cfg.num_workers), processes=1,
                                            world_size=source.world_size)  # JPEG reads on host threads
        self.device_id = dali_device_id(cfg)
        self.bad: dict[int, tuple[str, str]] = {}   # gid -> (reason, detail), found by decode failures
        self._prep = ThreadPoolExecutor(1)               # the next batch's host side, ahead of DALI
        self._pipe = None
        self._feeder: _Feeder | None = None
        self.pipelines_built = 0  # one for a whole run unless resumed elsewhere or a batch failed
        _LIVE.add(self)
        self._pid = os.getpid()  # its thread pools and pipeline exist in this process only
        s = cfg.image_size
        self._outputs = BufferPool((cfg.batch_size, 3, s, s), 3)  # CPU outputs: the caller's, the next, one spare

    # -- host side: bytes and geometry of one batch ------------------------------------------

    def host_batch(self, epoch: int, b: int) -> tuple[list, object, list[dict]]:
        """(inputs for the pipeline, samples after replacement, skipped records) of one planned batch."""
        samples, marked = self.source.batch(epoch, b)
        datas = self.files.read(samples.shard, samples.offset, samples.size,
                                ahead=lambda s: self.source.ahead(epoch, s))
        for row, reason in marked:
            datas[row] = SampleError(reason, "in the shard's sidecar")
        for row, g in enumerate(samples.gid):
            if int(g) in self.bad:
                datas[row] = SampleError(*self.bad[int(g)])
        good = [i for i, d in enumerate(datas) if not isinstance(d, SampleError)]
        bad = [i for i, d in enumerate(datas) if isinstance(d, SampleError)]
        skipped = [{"shard": self.source.index.names[int(samples.shard[i])], "key": samples.key[i].decode(),
                    "reason": datas[i].reason, "detail": datas[i].detail} for i in bad]
        if skipped and not good:
            raise RuntimeError(f"every sample of a batch is unreadable ({skipped[:3]} ...): the shards are broken")
        for i in bad:
            datas[i] = datas[good[0]]
        samples.replace(bad, good[0] if good else 0)
        datas = [np.frombuffer(d, np.uint8) for d in datas]
        boxes, flips = geometry(self.cfg, samples.wh, samples.gid, epoch)
        starts = np.ascontiguousarray(boxes[:, [1, 0]], np.float32)  # DALI ROIs follow the HWC shape order
        ends = np.ascontiguousarray(boxes[:, [3, 2]], np.float32)
        return [datas, starts, ends, flips.astype(np.int32)], samples, skipped

    # -- the pipeline ------------------------------------------------------------------------

    def _pipeline(self, feed):
        from nvidia.dali import fn, pipeline_def, types

        mixed = self.device_id is not None
        s = self.cfg.image_size

        @pipeline_def(batch_size=self.cfg.batch_size, num_threads=self.cfg.dali_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.cfg.prefetch_batches)
        def pipe():
            jpegs, roi_start, roi_end, mirror = fn.external_source(
                source=feed, num_outputs=4, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
            images = fn.decoders.image(jpegs, device="mixed" if mixed else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=s, resize_y=s, roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD])

        p = pipe()
        p.build()
        return p

    def batches(self, epoch: int, *, start: int) -> Iterator[Batch]:
        """Batches start.. of `epoch` in plan order, on the kept pipeline when it is already there."""
        if os.getpid() != self._pid:  # a forked child: the thread pools have no threads here and would hang
            raise RuntimeError("a DALI loader cannot be used in a process forked from the one that built it; "
                               "build a new loader in the child")
        s = self.cfg.image_size
        b = start
        while b < self.source.batches_per_epoch:
            if self.source.batch_len(b) == 0:  # drop_last=False can give a rank an empty last batch
                yield Batch(b, torch.empty(0, 3, s, s), self.source.batch(epoch, b)[0], [])
                b += 1
                continue
            if self._feeder is None or self._feeder.next_out() != (epoch, b):
                self._restart(epoch, b)  # first use, a jump (resume, another epoch), or after a bad batch
            try:
                (out,) = self._pipe.run()
            except RuntimeError as e:
                self._find_bad(epoch, b, e)  # raises when Pillow finds nothing wrong
                self._close()  # a failed run leaves the pipeline unusable: rebuilt, batch b re-run
                continue
            fed_epoch, fed_index, samples, skipped = self._feeder.fed.popleft()
            assert (fed_epoch, fed_index) == (epoch, b), f"DALI output {(fed_epoch, fed_index)}, expected {(epoch, b)}"
            yield Batch(b, self._to_torch(out), samples, skipped)
            b += 1

    def jobs(self, epoch: int, start: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch index) in feed order from batch `start` of `epoch` on, running on into the
        following epochs, so that DALI's prefetch at the end of an epoch prepares the start of the
        next one and the pipeline is kept from epoch to epoch. Empty batches are not fed."""
        nb = self.source.batches_per_epoch
        if not any(self.source.batch_len(b) for b in range(nb)):
            return  # this rank's epochs hold nothing to decode (fewer samples than ranks)
        while True:
            for b in range(start, nb):
                if self.source.batch_len(b):
                    yield epoch, b
            epoch, start = epoch + 1, 0

    def _restart(self, epoch: int, start: int) -> None:
        self._close()
        self.source.set_reader(1, 0, epoch, start)  # this process makes all of the rank's batches from here
        self._feeder = _Feeder(self.jobs(epoch, start), self._prep, self.host_batch)
        self._pipe = self._pipeline(self._feeder)
        self.pipelines_built += 1

    def _close(self) -> None:
        self._pipe = self._feeder = None

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.device_id is None:  # copied (DALI reuses its output buffers) into a reused host buffer
            dst = self._outputs.take(t.shape()[0])
            feed_ndarray(t, dst)
            return dst
        dst = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
        return dst

    def _find_bad(self, epoch: int, b: int, error: Exception) -> None:
        """A batch failed in DALI: find its broken JPEGs with Pillow and remember them."""
        import io

        from PIL import Image

        samples, _ = self.source.batch(epoch, b)
        datas = self.files.read(samples.shard, samples.offset, samples.size,
                                ahead=lambda s: self.source.ahead(epoch, s))
        found = False
        for g, data in zip(samples.gid.tolist(), datas):
            if g in self.bad or isinstance(data, SampleError):
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except (OSError, ValueError, SyntaxError) as e:
                self.bad[g], found = ("decode_error", f"{e} (DALI: {str(error).splitlines()[0]})"), True
        if not found:
            raise error


class _Feeder:
    """DALI's `external_source` callback: host batches in job order, the next one always being prepared
    on the background thread while DALI works. DALI calls it once per scheduled iteration, in order and
    ahead of `run()` (prefetch), so `fed` holds, oldest first, the jobs whose outputs `run()` returns next.
    """

    def __init__(self, jobs: Iterator[tuple[int, int]], prep: ThreadPoolExecutor, host_batch):
        self.jobs, self.prep, self.host_batch = jobs, prep, host_batch
        self.ahead: deque[tuple[int, int, Future]] = deque()   # submitted to the prep thread, not yet fed
        self.fed: deque[tuple[int, int, object, list[dict]]] = deque()  # fed to DALI, output not taken
        self._fill()

    def _fill(self) -> None:
        while len(self.ahead) < 2:
            job = next(self.jobs, None)
            if job is None:
                return
            epoch, index = job
            self.ahead.append((epoch, index, self.prep.submit(self.host_batch, epoch, index)))

    def next_out(self) -> tuple[int, int] | None:
        """(epoch, batch index) of the output the next `run()` returns."""
        head = self.fed[0] if self.fed else self.ahead[0] if self.ahead else None
        return None if head is None else (head[0], head[1])

    def __call__(self):
        if not self.ahead:
            raise StopIteration  # nothing left to decode (only reached by prefetch past the last job)
        epoch, index, future = self.ahead.popleft()
        self._fill()
        inputs, samples, skipped = future.result()
        self.fed.append((epoch, index, samples, skipped))
        return tuple(inputs)
