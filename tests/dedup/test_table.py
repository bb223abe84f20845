"""The bounded-memory dedup passes (maws_data.dedup.table) on real injected copies and against brute force."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from dedup_images import IMAGENETTE_VAL, VARIANTS, distinct_photos, make_variant
from maws_data.dedup.hashes import content_hash, hamming, phash_bytes
from maws_data.dedup.table import DUPLICATE, NEAR, NEAR_THRESHOLD, Decisions, dedup, write_unit
from maws_data.images import ImageConfig, process_image

CFG = ImageConfig(image_size=256)


def builder_hash(data: bytes) -> int:
    """The phash of the image the builder stores for these bytes (decode, orient, resize, encode)."""
    return phash_bytes(process_image(data, CFG)[0])


@pytest.fixture(scope="module")
def injected(real_images):
    """Rows 0-11: 8 distinct Instagram photos + 4 Imagenette val images; then each variant of each."""
    sources = [p.read_bytes() for p in distinct_photos(8)]
    sources += [p.read_bytes() for p in sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[::400][:4]]
    keys, datas = [f"src{i}" for i in range(len(sources))], list(sources)
    for kind in VARIANTS:
        for i, d in enumerate(sources):
            keys.append(f"{kind}{i}")
            datas.append(make_variant(d, kind))
    return {"keys": keys, "sha": [content_hash(d) for d in datas],
            "phash": np.array([builder_hash(d) for d in datas], np.uint64), "n_src": len(sources)}


def run(tmp_path, rows, keys, sha, ph, *, chunks: int, **kw) -> Decisions:
    bounds = np.linspace(0, len(rows), chunks + 1).astype(int)
    for c in range(chunks)[::-1]:  # written in reverse order: the result must not care
        a, b = bounds[c], bounds[c + 1]
        write_unit(tmp_path, f"unit-{c}", rows=rows[a:b], keys=keys[a:b], sha256=sha[a:b], phash=ph[a:b])
    return dedup(tmp_path, **kw)


def by_key(d: Decisions) -> dict[str, tuple[str, str]]:
    return {r["key"]: (r["reason"], r["kept_key"]) for r in d.for_rows(0, 10**9)}


def test_injected_copies_caught_with_the_right_reason(injected, tmp_path):
    x = injected
    rows = np.arange(len(x["keys"])) * 10  # row numbers need not be dense
    d = run(tmp_path, rows, x["keys"], x["sha"], x["phash"], chunks=1, mode="near")
    got = by_key(d)
    n = x["n_src"]
    for i in range(n):
        assert f"src{i}" not in got, f"distinct photo src{i} removed: {got.get(f'src{i}')}"
        assert got[f"exact{i}"] == (DUPLICATE, f"src{i}")
        for kind in ("q50", "half", "gray"):
            assert got[f"{kind}{i}"] == (NEAR, f"src{i}"), f"{kind}{i} (distance {int(hamming(x['phash'][i], x['phash'][x['keys'].index(f'{kind}{i}')]))})"
    # Mirrors are never caught by the training-side near pass: a mirrored image's pHash is ~32 bits
    # away (the odd horizontal frequencies change sign). Crops (5% off each side) mostly are not
    # (median 10 bits, docs/dedup.md); decontamination catches both through its eval views.
    assert not any(f"flip{i}" in got for i in range(n))
    assert sum(f"crop{i}" in got for i in range(n)) <= 2
    for r in d.for_rows(0, 10**9):  # every detail names a kept row
        assert r["kept_key"] not in got
    exact_only = by_key(dedup(tmp_path, mode="exact"))
    assert exact_only == {f"exact{i}": (DUPLICATE, f"src{i}") for i in range(n)}


def test_decisions_do_not_depend_on_the_split(injected, tmp_path):
    x = injected
    rows = np.arange(len(x["keys"]))
    one = run(tmp_path / "one", rows, x["keys"], x["sha"], x["phash"], chunks=1, mode="near", partitions=1)
    three = run(tmp_path / "three", rows, x["keys"], x["sha"], x["phash"], chunks=3, mode="near", partitions=4,
                spill_records=50)
    for f in ("row", "reason", "kept_row", "distance", "key", "kept_key"):
        assert np.array_equal(getattr(one, f), getattr(three, f)), f
    assert Decisions.load(tmp_path / "three" / "decisions.npz").row.tolist() == one.row.tolist()
    assert len(one) >= 4 * x["n_src"]


def brute_force(sha: list[str], ph: np.ndarray, k: int | None) -> dict[int, tuple[int, int]]:
    """The documented rule, quadratically: exact copies first, then near in row order."""
    removed: dict[int, tuple[int, int]] = {}
    first: dict[str, int] = {}
    for j, s in enumerate(sha):
        if s in first:
            removed[j] = (1, first[s])
        else:
            first[s] = j
    if k is not None:
        for j in range(len(ph)):
            if j in removed:
                continue
            for i in np.flatnonzero(hamming(ph[:j], ph[j]) <= k):
                if int(i) not in removed:
                    removed[j] = (2, int(i))
                    break
    return removed


@pytest.mark.parametrize("k", [NEAR_THRESHOLD, 4])
def test_equals_brute_force_for_any_split(tmp_path, k, monkeypatch):
    from maws_data.dedup import table

    monkeypatch.setattr(table, "RESOLVE_CHUNK", 7)  # resolve's chunk boundaries fall inside the pairs
    rng = np.random.default_rng(k)
    n = 1500
    ph = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    for j in range(50, n, 23):  # near copies (0-6 bits), chains included
        ph[j] = ph[rng.integers(0, j)]
        for b in rng.choice(64, rng.integers(0, 7), replace=False):
            ph[j] ^= np.uint64(1) << np.uint64(b)
    for j in range(30, n, 11):  # a placeholder image re-encoded ~135 times: the same phash, other bytes
        ph[j] = ph[5]
    for j in range(34, n, 53):  # and a few images 2 bits away from it
        ph[j] = ph[5] ^ np.uint64(0b101 << 20)
    for j in range(70, n, 97):  # exact copies
        i = int(rng.integers(0, j))
        sha[j], ph[j] = sha[i], ph[i]
    rows = np.arange(n)
    keys = [f"k{r}" for r in rows]
    for mode, kk in (("exact", None), ("near", k)):
        expected = brute_force(sha, ph, kk)
        for chunks, parts in ((1, 1), (3, 2), (5, 7)):
            d = run(tmp_path / f"{mode}{chunks}", rows, keys, sha, ph, chunks=chunks, mode=mode, threshold=k,
                    partitions=parts, spill_records=300)
            assert {int(r): (int(c), int(kr)) for r, c, kr in zip(d.row, d.reason, d.kept_row)} == expected


def test_repeated_hash_costs_linear_pairs(tmp_path):
    """m rows with one phash give m - 1 alias pairs per table, not m^2 / 2."""
    from maws_data.dedup.table import make_plan, reduce_near, spill

    m = 400
    write_unit(tmp_path, "u", rows=np.arange(m), keys=[f"k{i}" for i in range(m)],
               sha256=[hashlib.sha256(bytes([i % 256, i // 256])).hexdigest() for i in range(m)],
               phash=[0x0123456789ABCDEF] * m)
    plan = make_plan("near", m, partitions=1)
    spill(tmp_path, [tmp_path / "units" / "u.npz"], "s", plan, m)
    pairs = reduce_near(tmp_path, 0, plan)
    assert len(pairs) == m - 1 and len(np.unique(pairs, axis=0)) == m - 1  # once each, not once per table
    d = dedup(tmp_path, mode="near")
    assert len(d) == m - 1 and set(d.kept_row.tolist()) == {0}
