"""Crop geometry shared by both loader backends: counter-based draws, torchvision's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from maws_data.transforms import (
    CROP_RATIO,
    GEOMETRY_DRAWS,
    batch_geometry,
    eval_boxes,
    eval_resize_size,
    random_resized_crop_boxes,
    sample_uniforms,
)


def test_uniforms_depend_on_seed_epoch_and_sample_only():
    gids = np.arange(1000, 1256)
    u = sample_uniforms(7, 3, gids, 5)
    assert u.shape == (256, 5) and u.min() >= 0.0 and u.max() < 1.0
    perm = np.random.default_rng(0).permutation(256)
    assert np.array_equal(sample_uniforms(7, 3, gids[perm], 5), u[perm])   # batch-mates do not matter
    assert not np.allclose(sample_uniforms(7, 4, gids, 5), u)              # another epoch, other draws
    assert not np.allclose(sample_uniforms(8, 3, gids, 5), u)              # another seed, other draws


def test_uniforms_look_uniform_and_independent():
    u = sample_uniforms(0, 0, np.arange(200_000), 2)
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    assert np.histogram(u[:, 0], bins=10, range=(0, 1))[0].min() > 19_000    # 20,000 expected per bin
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.01                # neighbouring samples
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.01                   # draws of one sample


def reference_eval_box(width: int, height: int, image_size: int) -> tuple[float, ...]:
    """torchvision Resize(shorter side) + CenterCrop written out in plain Python, one image."""
    short = eval_resize_size(image_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left, top = round((new_w - image_size) / 2.0), round((new_h - image_size) / 2.0)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy


@pytest.mark.parametrize("size", [(256, 341), (341, 256), (256, 256), (64, 900), (1000, 3), (227, 229)])
def test_eval_boxes_equal_torchvision_resize_then_centre_crop(size):
    boxes = eval_boxes(np.array([size[0]]), np.array([size[1]]), 224)
    assert boxes[0].tolist() == list(reference_eval_box(*size, 224))


def test_random_crops_fit_and_follow_the_recipe():
    n = 4000
    w, h = np.full(n, 341), np.full(n, 256)
    boxes, flips = batch_geometry(w, h, np.arange(n), task="mae", image_size=224, seed=1, epoch=0)
    left, top, right, bottom = boxes.T
    assert np.array_equal(boxes, np.round(boxes))                           # whole pixels, as torchvision
    assert (left >= 0).all() and (top >= 0).all() and (right <= 341).all() and (bottom <= 256).all()
    area = (right - left) * (bottom - top) / (341 * 256)
    aspect = (right - left) / (bottom - top)
    assert area.min() > 0.19 and area.max() <= 1.0                         # mae scale (0.2, 1.0), rounding
    assert aspect.min() > CROP_RATIO[0] * 0.97 and aspect.max() < CROP_RATIO[1] * 1.03
    assert abs(flips.mean() - 0.5) < 0.03
    again, _ = batch_geometry(w, h, np.arange(n), task="mae", image_size=224, seed=1, epoch=0)
    assert np.array_equal(again, boxes)


def test_random_crops_have_torchvisions_distribution():
    """Same (area, aspect) distribution as torchvision's RandomResizedCrop.get_params, image 341 x 256."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    n, w, h = 6000, 341, 256
    boxes = random_resized_crop_boxes(np.full(n, w), np.full(n, h),
                                      sample_uniforms(0, 0, np.arange(n), GEOMETRY_DRAWS), scale=(0.08, 1.0))
    ours_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h)
    ours_cx = (boxes[:, 0] + boxes[:, 2]) / 2 / w
    torch.manual_seed(0)
    img = Image.new("RGB", (w, h))
    ref = np.array([RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=list(CROP_RATIO)) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (w * h)                              # (top, left, h, w)
    ref_cx = (ref[:, 1] + ref[:, 3] / 2) / w
    for ours, theirs in ((ours_area, ref_area), (ours_cx, ref_cx)):
        assert abs(ours.mean() - theirs.mean()) < 0.015, (ours.mean(), theirs.mean())
        assert np.abs(np.quantile(ours, [0.1, 0.5, 0.9]) - np.quantile(theirs, [0.1, 0.5, 0.9])).max() < 0.03


def test_impossible_draws_fall_back_to_the_centre_crop():
    """A 1000 x 3 strip: no draw fits, so the crop is the centred ratio-clamped box (torchvision's fallback)."""
    boxes, _ = batch_geometry(np.array([1000]), np.array([3]), np.array([5]), task="wsp", image_size=224, seed=0,
                              epoch=0)
    assert boxes[0].tolist() == [498.0, 0.0, 502.0, 3.0]                    # w = round(3 * 4/3) = 4, centred
