"""Hashes: sha256 as hashlib; pHash properties the passes rely on; the mirror/crop views."""

from __future__ import annotations

import hashlib

import numpy as np
from dedup_images import IG_IMAGES
from maws_data.dedup.hashes import content_hash, eval_hashes, hamming, open_image, phash, phash_pair
from maws_data.dedup.mih import MultiIndex, block_masks, plan_blocks, table_masks
from PIL import ImageOps


def test_content_hash_is_sha256_hex():
    assert content_hash(b"maws") == hashlib.sha256(b"maws").hexdigest()


def test_phash_has_32_bits_set_and_even_distances(real_images):
    files = sorted(IG_IMAGES.glob("*.jpg"))[:40]
    hs = np.array([phash(open_image(f.read_bytes())) for f in files], np.uint64)
    assert (np.bitwise_count(hs) == 32).all()  # threshold at the median: half the bits set
    d = hamming(hs[:, None], hs[None, :])
    assert (d % 2 == 0).all() and (d[np.triu_indices(len(hs), 1)] > 0).all()


def test_mirror_hash_from_the_same_dct(real_images):
    im = open_image(sorted(IG_IMAGES.glob("*.jpg"))[3].read_bytes())
    h, m = phash_pair(im)
    assert h == phash(im) and m == phash(ImageOps.mirror(im))
    assert hamming(h, m) > 16  # a plain pHash does not see a mirror as a copy
    full, mirror, crop, mirror_crop = eval_hashes(im)
    assert (full, mirror) == (h, m) and hamming(crop, full) > 0 and mirror_crop != crop


def test_tables_cover_every_pair_within_k():
    for blocks in (3, 5, 8):
        assert sum(block_masks(blocks)) == 2**64 - 1
    masks = table_masks(4, 8)
    assert len(masks) == 70
    rng = np.random.default_rng(0)
    for _ in range(200):  # pigeonhole: any 4 flipped bits leave some table's key unchanged
        bits = rng.choice(64, 4, replace=False)
        flip = np.uint64(sum(1 << int(b) for b in bits))
        assert ((masks & flip) == 0).any()
    assert plan_blocks(2, 10**9) == 4 and plan_blocks(4, 10**9) == 8


def test_multi_index_equals_brute_force():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**63, 2000, dtype=np.uint64) * np.uint64(2)
    q = values[:200].copy()
    for i in range(200):
        for b in rng.choice(64, i % 9, replace=False):
            q[i] ^= np.uint64(1) << np.uint64(b)
    q = np.concatenate([q, rng.integers(0, 2**63, 100, dtype=np.uint64)])
    ids = np.arange(len(values)) // 2  # two hashes per id, as an eval image has several views
    d = hamming(q[:, None], values[None, :]).astype(int)
    for k in (0, 3, 6):
        got_id, got_d = MultiIndex.build(values, ids, k).query(q)
        best = d.min(axis=1)
        # expected id: the smallest id among the nearest within k
        exp_id = np.array([ids[np.flatnonzero(row == b)].min() if b <= k else -1 for row, b in zip(d, best)])
        assert (got_id == exp_id).all()
        assert (got_d == np.where(best <= k, best, -1)).all()
