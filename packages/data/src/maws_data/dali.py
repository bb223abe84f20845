"""The DALI backend of `maws_data.loader`: JPEG decode + crop/resize + normalise in a DALI pipeline.

Imported only when the loader's backend is "dali" (DALI is a heavy optional import).

Why `fn.external_source` and not `fn.readers.webdataset`: the DALI reader splits the dataset by
contiguous sample ranges per `shard_id`, pads ranks to equal length with repeated samples and
shuffles with a buffer, so it can give neither a seed+epoch sample permutation that is the same
for both backends nor an exact mid-epoch resume. Instead the loader's epoch plan (sample ids per
batch) is read on the host -- one `pread` per JPEG at the offset in the builder's DALI `.idx`
index, on a small thread pool -- and fed to the pipeline as encoded bytes. The crop box and flip
of every sample come from the same function as the Pillow backend (`plan_geometry`, vectorised over
the batch, a function of seed, epoch and sample id), so both backends produce the same crops. The
host side of batch i+1 is prepared on a background thread while DALI works on batch i.

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

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from maws_data.loader import Batch, LoaderConfig, SampleError, SampleReader, plan_geometry
from maws_data.transforms import IMAGENET_MEAN, IMAGENET_STD


def dali_device_id(cfg: LoaderConfig) -> int | None:
    """CUDA device for "mixed" decoding, or None for the CPU pipeline."""
    if cfg.dali_device == "cpu" or (cfg.dali_device == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("dali_device='gpu' but CUDA is not available")
    return torch.cuda.current_device()


class DaliBatches:
    """Runs the loader's plan through a DALI pipeline; `batches()` yields `Batch`es in plan order."""

    def __init__(self, cfg: LoaderConfig, reader: SampleReader):
        self.cfg, self.reader = cfg, reader
        self.device_id = dali_device_id(cfg)
        self.bad: dict[int, tuple[str, str]] = {}   # gid -> (reason, detail), found by decode failures
        self._threads = max(1, cfg.num_workers)
        self._pool = ThreadPoolExecutor(self._threads)   # JPEG reads (pread releases the GIL)
        self._prep = ThreadPoolExecutor(1)               # the next batch's host side, ahead of DALI

    # -- host side: bytes and geometry of one batch ------------------------------------------

    def host_batch(self, gids: np.ndarray, epoch: int) -> tuple[list, np.ndarray, list[dict]]:
        """(inputs for the pipeline, gids after replacement, skipped records) of one planned batch."""
        gids = gids.copy()
        chunks = np.array_split(gids, min(self._threads, len(gids)))  # one task per thread, not per JPEG
        datas = [d for part in self._pool.map(lambda c: [self._read(int(g)) for g in c], chunks) for d in part]
        good = [i for i, d in enumerate(datas) if not isinstance(d, SampleError)]
        skipped = [{**self.reader.where(int(gids[i])), "reason": d.reason, "detail": d.detail}
                   for i, d in enumerate(datas) if isinstance(d, SampleError)]
        if skipped and not good:
            raise RuntimeError(f"every sample of a batch is unreadable ({skipped[:3]} ...): the shards are broken")
        for i, d in enumerate(datas):
            if isinstance(d, SampleError):
                gids[i], datas[i] = gids[good[0]], datas[good[0]]
        boxes, flips = plan_geometry(self.cfg, self.reader.table, gids, epoch)
        starts = np.ascontiguousarray(boxes[:, [1, 0]], np.float32)  # DALI ROIs follow the HWC shape order
        ends = np.ascontiguousarray(boxes[:, [3, 2]], np.float32)
        return [datas, starts, ends, flips.astype(np.int32)], gids, skipped

    def _read(self, gid: int) -> np.ndarray | SampleError:
        if gid in self.bad:
            return SampleError(*self.bad[gid])
        try:
            return np.frombuffer(self.reader.jpeg(gid), np.uint8)
        except SampleError as e:
            return e

    # -- the pipeline ------------------------------------------------------------------------

    def _pipeline(self, feed):
        from nvidia.dali import fn, pipeline_def, types

        mixed = self.device_id is not None
        s = self.cfg.image_size

        @pipeline_def(batch_size=self.cfg.batch_size, num_threads=self.cfg.dali_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.cfg.prefetch_batches)
        def pipe():
            jpegs, roi_start, roi_end, mirror = fn.external_source(
                source=feed, num_outputs=4, batch=True, batch_info=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
            images = fn.decoders.image(jpegs, device="mixed" if mixed else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=s, resize_y=s, roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD])

        p = pipe()
        p.build()
        return p

    def batches(self, plan: list[np.ndarray], *, start: int, epoch: int) -> Iterator[Batch]:
        s = self.cfg.image_size
        b = start
        while b < len(plan):
            if len(plan[b]) == 0:  # drop_last=False can give a rank an empty last batch
                yield Batch(b, torch.empty(0, 3, s, s), plan[b], [])
                b += 1
                continue
            todo = [i for i in range(b, len(plan)) if len(plan[i])]
            meta: dict[int, tuple[np.ndarray, list[dict]]] = {}
            pipe = self._pipeline(self._feeder(plan, todo, meta, epoch))
            try:
                for i in todo:
                    try:
                        (out,) = pipe.run()
                    except RuntimeError as e:
                        self._find_bad(plan[i], e)  # raises when Pillow finds nothing wrong
                        b = i
                        break
                    gids, skipped = meta.pop(i)
                    yield Batch(i, self._to_torch(out), gids, skipped)
                    b = i + 1
                else:
                    b = todo[-1] + 1  # trailing empty batches (drop_last=False) are yielded above
            finally:
                del pipe

    def _feeder(self, plan: list[np.ndarray], todo: list[int], meta: dict, epoch: int):
        ahead: dict = {}  # position in `todo` -> future of its host batch

        def submit(k: int) -> None:
            if k < len(todo) and k not in ahead:
                ahead[k] = self._prep.submit(self.host_batch, plan[todo[k]], epoch)

        def feed(info):
            # DALI asks ahead (prefetch); past the end it gets the last batch again, never run.
            k = min(info.iteration, len(todo) - 1)
            submit(k)
            submit(k + 1)  # prepared on the background thread while DALI runs batch k
            inputs, gids, skipped = (ahead.pop(k) if k < len(todo) - 1 else ahead[k]).result()
            meta[todo[k]] = (gids, skipped)
            return tuple(inputs)

        return feed

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(t))  # copy: DALI reuses its output buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
        return dst

    def _find_bad(self, gids: np.ndarray, error: Exception) -> None:
        """A batch failed in DALI: find its broken JPEGs with Pillow and remember them."""
        import io

        from PIL import Image

        found = False
        for g in {int(g) for g in gids} - set(self.bad):
            try:
                with Image.open(io.BytesIO(self.reader.jpeg(g))) as im:
                    im.load()
            except SampleError as e:
                self.bad[g], found = (e.reason, e.detail), True
            except (OSError, ValueError, SyntaxError) as e:
                self.bad[g], found = ("decode_error", f"{e} (DALI: {str(error).splitlines()[0]})"), True
        if not found:
            raise error
