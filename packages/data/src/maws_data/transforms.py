"""CPU image transforms for the three recipes (MAE, WSP, eval), on Pillow-SIMD.

Recipes (the DALI pipeline in `dali.py` implements the same ones on the GPU):
  mae   RandomResizedCrop(scale 0.2-1.0, ratio 3/4-4/3, bicubic) + horizontal flip  (He et al. 2022)
  wsp   RandomResizedCrop(scale 0.08-1.0, ratio 3/4-4/3, bicubic) + horizontal flip  (the Inception/
        ImageNet crop that the MAWS and SWAG WSP recipes start from)
  eval  resize the shorter side to round(image_size / 0.875) (bicubic), centre crop image_size
        (224 -> 256 -> 224, the timm / DeiT evaluation transform)
Every recipe ends with ImageNet mean/std normalisation, float32, NCHW.

Speed: the crop box is drawn from the JPEG header size *before* decoding, so a large crop of a
large image is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT-domain scaling in libjpeg), and
crop + resize is one `Image.resize(box=...)` call. Augmentation randomness comes from a numpy
Generator the caller seeds per sample (seed, epoch, sample id), so a resumed epoch draws the same
crops as an uninterrupted one.

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


def crop_scale_for(task: Task, override: tuple[float, float] | None = None) -> tuple[float, float]:
    if override is not None:
        return override
    if task not in CROP_SCALE:
        raise ValueError(f"task {task!r} has no random crop (eval uses resize + centre crop)")
    return CROP_SCALE[task]


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: 224 -> 256."""
    return round(image_size / EVAL_CROP_PCT)


def random_resized_crop_box(width: int, height: int, *, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) drawn as torchvision's RandomResizedCrop.get_params, from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback (as torchvision): the whole image, clamped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, image_size: int) -> tuple[float, float, float, float]:
    """Source-pixel box of "resize shorter side to eval_resize_size, centre crop image_size".

    Integer rounding follows torchvision Resize + CenterCrop, so one `resize(box=...)` gives the
    same pixels as the two-step version (Pillow takes filter support from outside the box).
    """
    short = eval_resize_size(image_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left = round((new_w - image_size) / 2.0)
    top = round((new_h - image_size) / 2.0)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy


def sample_geometry(width: int, height: int, *, task: Task, image_size: int, rng: np.random.Generator | None,
                    crop_scale: tuple[float, float] | None = None) -> tuple[tuple[float, float, float, float], bool]:
    """One sample's crop box (source pixels: left, top, right, bottom) and flip; both backends use it."""
    if task == "eval":
        return eval_box(width, height, image_size), False
    if rng is None:
        raise ValueError("random recipes need an rng")
    left, top, w, h = random_resized_crop_box(width, height, scale=crop_scale_for(task, crop_scale),
                                              ratio=CROP_RATIO, rng=rng)
    return (left, top, left + w, top + h), bool(rng.random() < 0.5)


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
