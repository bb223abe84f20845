"""Deduplication and eval-set decontamination (issue 12): hashes, bounded-memory exact/near passes,
eval indexes, and shard filtering. docs/dedup.md has the measurements and how the builder uses it.

    hashes.py      content_hash (sha256), phash (64-bit DCT), eval_hashes, hamming
    mih.py         multi-index hashing: every pair within k bits, exact (pigeonhole)
    table.py       write_unit -> dedup(table_dir) -> Decisions: exact + near over a whole build on disk
    decontam.py    EvalIndex (an eval folder's hashes) and decontaminate(build, against)
    filter.py      filter_shard: rewrite one shard without given keys (tar, idx, sidecar, stats last)

Imports only maws_data.manifest / sidecar / storage / shards. Used by maws_data.images (hashes),
maws_data.shards (eval index, unit files) and maws_data.deduppass (the dedup stage).
"""
