"""CPU image transforms for the three recipes (MAE, WSP, eval), on Pillow-SIMD.

Recipes (the DALI pipeline in `loader/dali.py` implements the same ones on the GPU):
  mae   RandomResizedCrop(scale 0.2-1.0, ratio 3/4-4/3, bicubic) + horizontal flip  (He et al. 2022)
  wsp   RandomResizedCrop(scale 0.08-1.0, ratio 3/4-4/3, bicubic) + horizontal flip  (the Inception/
        ImageNet crop that the MAWS and SWAG WSP recipes start from)
  eval  resize the shorter side to round(image_size / 0.875) (bicubic), centre crop image_size
        (224 -> 256 -> 224, the timm / DeiT evaluation transform)
Every recipe ends with ImageNet mean/std normalisation, float32, NCHW.

Speed: the crop box is drawn from the JPEG header size *before* decoding, so a large crop of a
large image is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT-domain scaling in libjpeg), and
crop + resize is one `Image.resize(box=...)` call. Augmentation randomness is a counter-based
function of (seed, epoch, sample id) (`sample_uniforms`), so a resumed epoch draws the same crops as
an uninterrupted one, and both loader backends draw a whole batch's crop boxes in a few numpy
operations (`batch_geometry`), not one seeded generator and Python loop per sample.

`torchvision_transform(task, image_size)` is the same recipe as a torchvision Compose, for
ImageFolder-style datasets (the evaluation package and the loader benchmark's baseline).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image

Task = Literal["mae", "wsp", "eval"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 0.875
CROP_RATIO = (3 / 4, 4 / 3)
CROP_SCALE: dict[str, tuple[float, float]] = {"mae": (0.2, 1.0), "wsp": (0.08, 1.0)}
RRC_ATTEMPTS = 10  # RandomResizedCrop tries this many (area, ratio) draws before its centre fallback
GEOMETRY_DRAWS = 2 * RRC_ATTEMPTS + 3  # + left, top, flip
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def crop_scale_for(task: Task, override: tuple[float, float] | None = None) -> tuple[float, float]:
    if override is not None:
        return override
    if task not in CROP_SCALE:
        raise ValueError(f"task {task!r} has no random crop (eval uses resize + centre crop)")
    return CROP_SCALE[task]


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: 224 -> 256."""
    return round(image_size / EVAL_CROP_PCT)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a bijective, well-mixing 64-bit hash (wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, gids: np.ndarray, draws: int) -> np.ndarray:
    """(len(gids), draws) floats in [0, 1), each a function of (seed, epoch, gid, draw index) only.

    Counter-based (splitmix64 over a per-draw counter, keyed by seed and epoch): a sample gets the same
    numbers in whatever batch, worker, backend or resumed run it is drawn, and a batch costs a few
    vectorised operations.
    """
    counters = (np.asarray(gids, np.uint64)[:, None] * np.uint64(draws)
                + np.arange(draws, dtype=np.uint64)[None, :])
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed + _GOLDEN) & _M64], np.uint64))
        key = _mix64(key + np.uint64((epoch + 1) * _GOLDEN & _M64))
        bits = _mix64(counters * np.uint64(_GOLDEN) + key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def eval_boxes(widths: np.ndarray, heights: np.ndarray, image_size: int) -> np.ndarray:
    """Source-pixel boxes (N, 4: left, top, right, bottom) of "resize the shorter side to
    eval_resize_size, centre crop image_size".

    Integer rounding follows torchvision Resize + CenterCrop, so one `resize(box=...)` gives the
    same pixels as the two-step version (Pillow takes filter support from outside the box).
    """
    w, h = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    short = eval_resize_size(image_size)
    portrait = w <= h
    new_w = np.where(portrait, short, np.trunc(short * w / h))
    new_h = np.where(portrait, np.trunc(short * h / w), short)
    left, top = np.round((new_w - image_size) / 2.0), np.round((new_h - image_size) / 2.0)
    sx, sy = w / new_w, h / new_h
    return np.stack([left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy], axis=1)


def random_resized_crop_boxes(widths: np.ndarray, heights: np.ndarray, u: np.ndarray, *,
                              scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for a batch, from uniforms `u` (N, GEOMETRY_DRAWS):
    the first of RRC_ATTEMPTS (area, log-ratio) draws that fits, else the centre crop clamped to the
    ratio range. Returns (N, 4) integer-valued left, top, right, bottom."""
    w, h = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    a = RRC_ATTEMPTS
    target = (w * h)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :a])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, a:2 * a])
    cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    rows, first = np.arange(len(w)), fits.argmax(axis=1)
    found = fits[rows, first]
    cw, ch = cw[rows, first], ch[rows, first]
    left = np.floor(u[:, 2 * a] * (w - cw + 1))
    top = np.floor(u[:, 2 * a + 1] * (h - ch + 1))
    # torchvision's fallback: the whole image, clamped to the ratio range, centred.
    in_ratio = w / h
    fw = np.where(in_ratio > ratio[1], np.round(h * ratio[1]), w)
    fh = np.where(in_ratio < ratio[0], np.round(w / ratio[0]), h)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    left = np.where(found, left, np.floor((w - fw) / 2))
    top = np.where(found, top, np.floor((h - fh) / 2))
    return np.stack([left, top, left + cw, top + ch], axis=1)


def batch_geometry(widths: np.ndarray, heights: np.ndarray, gids: np.ndarray, *, task: Task, image_size: int,
                   seed: int, epoch: int, crop_scale: tuple[float, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes (N, 4: left, top, right, bottom in source pixels) and flips (N,) of a batch.

    Both loader backends call it, so they crop every sample identically; a sample's box depends on
    (seed, epoch, gid) and its size only, never on its batch-mates.
    """
    if task == "eval":
        return eval_boxes(widths, heights, image_size), np.zeros(len(gids), bool)
    u = sample_uniforms(seed, epoch, gids, GEOMETRY_DRAWS)
    boxes = random_resized_crop_boxes(widths, heights, u, scale=crop_scale_for(task, crop_scale))
    return boxes, u[:, -1] < 0.5


def crop_resize(im: Image.Image, box: tuple[float, float, float, float], flip: bool, size: int) -> np.ndarray:
    """Opened (not yet decoded) image -> uint8 (size, size, 3): box resized bicubic, then flipped."""
    full_w = im.width
    bw, bh = box[2] - box[0], box[3] - box[1]
    if im.format == "JPEG" and bw >= 2 * size and bh >= 2 * size:
        # libjpeg decodes at the largest 1/2..1/8 scale that keeps the box >= size (DCT-domain
        # scaling: a 4x smaller decode is ~3x faster and the bicubic resize has less to do).
        im.draft("RGB", (max(1, int(im.width * size / bw)), max(1, int(im.height * size / bh))))
    sc = im.width / full_w
    if im.mode != "RGB":
        im = im.convert("RGB")
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=tuple(c * sc for c in box))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


# uint8 value -> normalised float32, per channel: (3, 256). A table lookup per pixel (np.take, while
# the image is still in cache) is ~7x faster than torch's permute + float + sub + div on a batch
# (0.37 vs 2.7 ms per 224 px image, one core): on a CPU loader that step was the bottleneck.
NORMALIZE_LUT = ((np.arange(256, dtype=np.float32)[None, :] - 255 * np.array(IMAGENET_MEAN, np.float32)[:, None])
                 / (255 * np.array(IMAGENET_STD, np.float32)[:, None])).astype(np.float32)


def normalize_into(out_chw: np.ndarray, image_hwc: np.ndarray) -> None:
    """uint8 (H, W, 3) -> float32 (3, H, W) ImageNet-normalised, written into `out_chw`."""
    for c in range(3):
        np.take(NORMALIZE_LUT[c], image_hwc[:, :, c], out=out_chw[c])


def normalize_batch(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), ImageNet mean/std."""
    n, h, w, _ = images_nhwc.shape
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        normalize_into(out[i], images_nhwc[i])
    return torch.from_numpy(out)


def torchvision_transform(task: Task, image_size: int, *, crop_scale: tuple[float, float] | None = None):
    """The same recipe as a torchvision Compose on PIL images (ImageFolder and friends)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if task == "eval":
        head = [T.Resize(eval_resize_size(image_size), interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        head = [T.RandomResizedCrop(image_size, scale=crop_scale_for(task, crop_scale), ratio=CROP_RATIO,
                                    interpolation=bicubic), T.RandomHorizontalFlip()]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
