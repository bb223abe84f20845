"""Multi-index hashing: every pair of 64-bit hashes within Hamming distance k, without comparing all pairs.

Pigeonhole (Manku, Jain, Das Sarma 2007, "Detecting near-duplicates for web crawling"): cut the 64
bits into B > k contiguous blocks. Two hashes that differ in at most k bits differ in at most k
blocks, so at least B - k blocks are identical. Make one table per choice of B - k blocks
(C(B, k) tables); the table key of a hash is the hash with only those blocks kept (`hash & mask`).
Any pair within k has an equal key in at least one table, so grouping each table by key and
checking the Hamming distance inside each group finds every such pair: the result is exact (recall
1 at threshold k) whatever B is. B = k + 1 is the classic "k + 1 bands" scheme (1 block per key).

B only sets the cost: C(B, k) table records per hash, and ~n / 2^(key bits) random companions per
record, key bits = 64 (B - k) / B. `plan_blocks(k, n)` picks the B that minimises
C(B, k) * (1 + n / 2^(key bits)): for k = 2 that is B = 4 (6 tables, 32-bit keys) from n ~ 10^6 up
to 10^9; for k = 4 at n = 10^9 it is B = 8 (70 tables, 32-bit keys).

`MultiIndex` is the in-memory version for a small fixed set (an eval set's hashes): one sorted key
array per table; a query is one `searchsorted` per table. Memory: O(C(B, k) * n) for n indexed hashes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from maws_data.dedup.hashes import hamming

BITS = 64


def block_masks(blocks: int) -> list[int]:
    """Masks of `blocks` contiguous bit ranges covering 64 bits (sizes differ by at most one)."""
    sizes = [BITS // blocks + (i < BITS % blocks) for i in range(blocks)]
    masks, start = [], BITS
    for s in sizes:  # most significant block first
        start -= s
        masks.append(((1 << s) - 1) << start)
    return masks


def table_masks(k: int, blocks: int) -> np.ndarray:
    """One uint64 mask per table: the OR of each choice of `blocks - k` blocks (lexicographic order)."""
    if not 0 <= k < blocks <= BITS:
        raise ValueError(f"need 0 <= k < blocks <= 64, got k={k}, blocks={blocks}")
    bm = block_masks(blocks)
    return np.array([sum(bm[i] for i in combo) for combo in itertools.combinations(range(blocks), blocks - k)],
                    dtype=np.uint64)


def key_bits(k: int, blocks: int) -> int:
    """Bits in the shortest table key (the smallest blocks kept)."""
    sizes = sorted(BITS // blocks + (i < BITS % blocks) for i in range(blocks))
    return sum(sizes[:blocks - k])


def plan_blocks(k: int, n: int, *, max_tables: int = 5000) -> int:
    """The number of blocks B minimising the expected work C(B, k) * (1 + n / 2^key_bits) per hash."""
    best, best_cost = k + 1, math.inf
    for b in range(k + 1, BITS + 1):
        tables = math.comb(b, k)
        if tables > max_tables:
            break
        cost = tables * (1 + n / 2.0 ** key_bits(k, b))
        if cost < best_cost:
            best, best_cost = b, cost
    return best


@dataclass
class MultiIndex:
    """Hashes `values` (n,) uint64 with a label id each, queried for all entries within k bits."""

    values: np.ndarray  # (n,) uint64, the indexed hashes
    ids: np.ndarray  # (n,) int64, what each hash stands for (e.g. an eval file's index)
    k: int
    masks: np.ndarray  # (tables,) uint64
    keys: list[np.ndarray]  # per table: sorted masked values
    order: list[np.ndarray]  # per table: argsort that sorted them

    @classmethod
    def build(cls, values: np.ndarray, ids: np.ndarray, k: int, blocks: int | None = None) -> MultiIndex:
        values = np.asarray(values, np.uint64).reshape(-1)
        masks = table_masks(k, blocks or plan_blocks(k, len(values)))
        keys, order = [], []
        for m in masks:
            masked = values & m
            o = np.argsort(masked, kind="stable")
            keys.append(masked[o])
            order.append(o)
        return cls(values, np.asarray(ids, np.int64).reshape(-1), k, masks, keys, order)

    def query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each query hash: (id of the nearest indexed hash within k, its distance), or (-1, -1).

        Ties in distance go to the smallest id, so the answer does not depend on the table order.
        """
        q = np.asarray(q, np.uint64).reshape(-1)
        best_d = np.full(len(q), BITS + 1, np.int64)
        best_id = np.full(len(q), -1, np.int64)
        for m, keys, order in zip(self.masks, self.keys, self.order):
            mq = q & m
            lo, hi = np.searchsorted(keys, mq, "left"), np.searchsorted(keys, mq, "right")
            counts = hi - lo
            if not counts.any():
                continue
            qi = np.repeat(np.arange(len(q)), counts)
            # positions lo[i], lo[i]+1, ..., hi[i]-1 for each query i, flattened
            pos = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            cand = order[pos]
            d = hamming(q[qi], self.values[cand]).astype(np.int64)
            ok = d <= self.k
            qi, cand, d = qi[ok], cand[ok], d[ok]
            cid = self.ids[cand]
            better = (d < best_d[qi]) | ((d == best_d[qi]) & (cid < best_id[qi]))
            # several candidates of one query may be "better" at once: apply them best-last
            o = np.lexsort((-cid[better], -d[better]))
            qb = qi[better][o]
            best_d[qb] = d[better][o]
            best_id[qb] = cid[better][o]
        best_d[best_id < 0] = -1
        return best_id, best_d
