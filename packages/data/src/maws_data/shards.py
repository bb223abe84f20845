"""One shard = one unit of work: fetch, decode and resize its rows' images, write the WebDataset tar,
its DALI index, and its stats JSON (last: the commit marker).

`write_shard(task)` is a pure function of the task (no global state besides DALI's pipeline cache),
so the local process pool and Ray run exactly the same code, and two runs write identical bytes:
samples go in row order, tar members carry fixed metadata (mtime 0, uid/gid 0, user/group "maws",
mode 0444, USTAR), and JSON is written with sorted keys.

The tar is written the way webdataset's `TarWriter` writes it (members of a sample in sorted extension
order, USTAR), not with `TarWriter` itself: importing webdataset imports torch, which costs every
spawned worker seconds and ~300 MB; tests read the shards back with webdataset. `TarWriter` below
writes the very bytes `tarfile` writes for these members (`add_sample`, tested byte for byte), from
a fixed header template, and records each member's offset and hashes the stream as it goes: the
DALI index and the tar's sha256 come without reading the tar back or parsing it (`tarfile` cost
~0.25 ms of Python per sample for header building plus the index's re-parse).

Files, for shard NNNNNN in `shards/` (see ARCHITECTURE.md "Build output"):
  shard-NNNNNN.tar    members KEY.cls, KEY.jpg, KEY.json per sample (webdataset's sorted order)
  shard-NNNNNN.idx    DALI `fn.readers.webdataset` index, the format of DALI's tools/wds2idx.py:
                      "v1.2 <samples>\\n", then one line per sample: "<ext> <data offset> <size> <name>"
                      for each member, space-separated
  shard-NNNNNN.samples.npz  per-sample sidecar for the loader (maws_data.sidecar): offsets, sizes, labels
  dedup/units/shard-NNNNNN.npz  (in the build's work folder, with --dedup exact|near) the written
                      rows' sha256 + phash for the dedup pass (maws_data.dedup.table), before the stats
  shard-NNNNNN.json   stats (contract fields) + label_counts / sqrt_weight (maws_data.sidecar.stats_fields) + "fingerprint" (the build it belongs to) and
                      "skipped_rows" (this shard's skipped rows, merged into skipped.jsonl at the end)
KEY.json carries "sha256" (of the source bytes) and "phash" (16 hex digits, of the resized image);
with an eval index (--decontaminate), rows whose phash is within its threshold of an eval image are
skipped as `eval_contaminated` before they are written. Each is written under a temporary dot-name and renamed. A shard whose rows were all skipped has
no tar and no index; its stats say `"shard": null, "samples": 0` and it is left out of the manifest.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from maws_data import sidecar, storage
from maws_data.dedup.decontam import REASON as EVAL_CONTAMINATED
from maws_data.dedup.decontam import EvalIndex
from maws_data.dedup.hashes import to_hex
from maws_data.dedup.table import UNITS, unit_bytes
from maws_data.images import ImageConfig, SkipSample, load_and_process_many, load_many, process_images_dali
from maws_data.manifest import read_bytes, sha256_file, write_bytes, write_json

# Fixed tar metadata: with these, the tar bytes depend only on the samples (reproducible builds).
TAR_USER = "maws"
TAR_MODE = 0o444
TAR_MTIME = 0
IDX_VERSION = "v1.2"


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass(frozen=True)
class ShardRow:
    """One input row that passed the text checks: everything needed to write its sample."""

    row: int
    key: str  # webdataset-safe, unique in the build
    source_key: str
    image: str | bytes | None
    base_dir: str
    caption: str | None  # None: the source's caption was null (kept, unlabeled; counted as caption_missing)
    hashtags: list[str]
    wnids: list[str]  # kept synsets only, caption order
    labels: list[int]  # their vocabulary indices


@dataclass(frozen=True)
class ShardTask:
    index: int
    first_row: int
    end_row: int  # exclusive
    rows: list[ShardRow]
    skipped: list[dict]  # rows already skipped by the text checks: {"row", "key", "reason", "detail"}
    shards_dir: str  # local folder or remote prefix
    image: ImageConfig  # decoder already resolved to "pil" or "dali"
    dali_device: str = "cpu"
    fingerprint: str = ""
    threads: int = 16  # load/decode threads in the worker (does not change the output)
    class_counts: tuple[int, ...] = ()  # vocabulary counts, for the shard's sqrt_weight (sidecar.stats_fields)
    dedup_dir: str | None = None  # write the dedup unit file under this table folder (None: --dedup none)
    eval_index: str | None = None  # saved EvalIndex (--decontaminate); None: no eval check
    eval_threshold: int = 6

    @property
    def stem(self) -> str:
        return shard_stem(self.index)


# One encoder for every sample: json.dumps with these options builds a new one per call.
_SAMPLE_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sample_json(r: ShardRow, width: int, height: int, sha256: str, phash: int) -> bytes:
    meta = {"key": r.key, "source_key": r.source_key, "caption": r.caption, "hashtags": r.hashtags,
            "wnids": r.wnids, "labels": r.labels, "labeled": bool(r.labels), "width": width, "height": height,
            "sha256": sha256, "phash": to_hex(phash)}
    return _SAMPLE_JSON.encode(meta).encode("utf-8")


def _images(task: ShardTask) -> list[tuple[bytes, int, int, str, int] | SkipSample]:
    """Each row's processed image (jpeg, w, h, sha256, phash) or the SkipSample saying why not, in row order.

    With Pillow, one thread: up to `task.threads` downloads in flight on a libcurl multi handle
    while this thread decodes, resizes and encodes what has arrived, and reads local files itself
    (the workers are one per core: 2 or 16 decoding threads cost 12% of the image pass against 1,
    docs/sources_images.md). The result order is the row order whatever the timing.
    """
    cfg = task.image
    refs = [(r.image, r.base_dir) for r in task.rows]
    if cfg.decoder != "dali":
        return load_and_process_many(refs, cfg, threads=task.threads, hashes=True, pipelined=True)
    loaded = load_many(refs, cfg, threads=task.threads)
    ok = [i for i, d in enumerate(loaded) if isinstance(d, bytes)]
    results: list = list(loaded)
    for i, res in zip(ok, process_images_dali([loaded[i] for i in ok], cfg, device=task.dali_device, hashes=True)):
        results[i] = res
    return results


def write_shard(task: ShardTask) -> dict:
    """Write the shard's tar, index, sidecar and stats; return the stats dict (also in shard-NNNNNN.json).

    `task.shards_dir` is a local folder or a remote prefix (`s3://...`): the tar is written to a
    local temporary file first either way (the DALI index and the checksum read it back), then
    renamed into place or uploaded. Order: tar, index, sidecar, stats JSON last (the commit marker).
    """
    remote = storage.is_remote(task.shards_dir)
    local_dir = Path(tempfile.mkdtemp(prefix="maws-shard-")) if remote else Path(task.shards_dir)
    try:
        return _write_shard(task, local_dir, remote)
    finally:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)


_eval_indexes: dict[str, EvalIndex] = {}


def _eval_index(url: str) -> EvalIndex:
    """The build's eval index, read once per worker process."""
    if url not in _eval_indexes:
        _eval_indexes.clear()
        _eval_indexes[url] = EvalIndex.from_bytes(read_bytes(url))
    return _eval_indexes[url]


def _contaminated(task: ShardTask, results: list) -> dict[int, dict]:
    """{position in task.rows: skip record} of the processed rows within the threshold of an eval image."""
    if task.eval_index is None:
        return {}
    done = [i for i, res in enumerate(results) if not isinstance(res, SkipSample)]
    if not done:
        return {}
    index = _eval_index(task.eval_index)
    ids, dist = index.match([results[i][4] for i in done], task.eval_threshold)
    return {i: {"row": task.rows[i].row, "key": task.rows[i].source_key, "reason": EVAL_CONTAMINATED,
                "detail": f"phash within {int(d)} bits of {index.files[e]}"}
            for i, e, d in zip(done, ids.tolist(), dist.tolist()) if e >= 0}


def _write_shard(task: ShardTask, local_dir: Path, remote: bool) -> dict:
    tmp_tar = local_dir / f".{task.stem}.tar.tmp"
    skipped = list(task.skipped)
    samples = labeled = missing = 0
    written_labels: list[list[int]] = []
    written_sizes: list[tuple[int, int]] = []
    unit: dict[str, list] = {"rows": [], "keys": [], "sha256": [], "phash": []}
    results = _images(task)
    contaminated = _contaminated(task, results)
    with open(tmp_tar, "wb") as f:
        tar = TarWriter(f)
        for i, (r, res) in enumerate(zip(task.rows, results)):
            if isinstance(res, SkipSample):
                skipped.append({"row": r.row, "key": r.source_key, "reason": res.reason, "detail": res.detail})
                continue
            if i in contaminated:
                skipped.append(contaminated[i])
                continue
            jpeg, w, h, sha, ph = res
            cls = str(r.labels[0] if r.labels else -1).encode("ascii")
            tar.add(r.key, {"jpg": jpeg, "cls": cls, "json": sample_json(r, w, h, sha, ph)})
            samples += 1
            labeled += bool(r.labels)
            missing += r.caption is None
            written_labels.append(r.labels)
            written_sizes.append((w, h))
            for field, value in zip(unit, (r.row, r.key, sha, ph)):
                unit[field].append(value)
        digest, size, index = tar.close()
        if samples:  # an empty tar is deleted below: no need to make it durable
            f.flush()
            os.fsync(f.fileno())
    skipped.sort(key=lambda s: s["row"])
    name = f"{task.stem}.tar"
    if samples:
        side = sidecar.encode(index, written_labels, written_sizes, sha256=unit["sha256"], phash=unit["phash"])
        if remote:  # the tar first: an index never names a tar that is not there yet
            fs, base = storage.filesystem(task.shards_dir)
            fs.put_file(str(tmp_tar), f"{base}/{name}")
        else:
            os.replace(tmp_tar, local_dir / name)
        write_bytes(storage.join(task.shards_dir, f"{task.stem}.idx"), index.encode("utf-8"))
        write_bytes(storage.join(task.shards_dir, f"{task.stem}{sidecar.SUFFIX}"), side)
    else:
        digest, size, name = None, 0, None
    tmp_tar.unlink(missing_ok=True)
    if task.dedup_dir is not None:  # before the commit marker: a finished shard always has its unit
        write_bytes(storage.join(task.dedup_dir, UNITS, f"{task.stem}.npz"), unit_bytes(task.stem, **unit))
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    stats = {"shard": name, "samples": samples, "labeled": labeled, "sha256": digest, "bytes": size,
             "rows": [task.first_row, task.end_row], "skipped": reasons, "skipped_rows": skipped,
             "caption_missing": missing,
             "fingerprint": task.fingerprint, **sidecar.stats_fields(written_labels, task.class_counts)}
    write_json(storage.join(task.shards_dir, f"{task.stem}.json"), stats, compact=True)  # last: the commit marker
    return stats


# The shard's fsync (before its commit marker) waits for the disk: 10-20 ms per 20 MB tar on this
# machine, a core idle for 1-2% of the image pass. Starting the writeback every few MB as the tar
# grows, as RocksDB's bytes_per_sync does, leaves the fsync ~3 ms (docs/sources_images.md).
WRITEBACK_BYTES = 4 << 20


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # Linux only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # start writing out the range's dirty pages; do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range of the file to disk now, without waiting (a hint:
    where sync_file_range is missing or refused, nothing happens and the fsync does it all)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def tar_trailer(length: int) -> bytes:
    """What `tarfile` writes when a stream-mode archive of `length` bytes is closed: two zero blocks,
    then zeros up to a whole record."""
    end = length + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)


class TarWriter:
    """A USTAR stream of samples, written to `f` exactly as `add_sample` + `tarfile` (mode "w|") would
    write it, with the DALI index and sha256 computed on the way (`close()`)."""

    # The fixed fields of every header (tarfile's USTAR layout, our fixed metadata): name and size
    # are filled in per member, then the checksum.
    _MODE_IDS = b"%07o\0" % TAR_MODE + b"0000000\0" * 2  # mode, uid, gid
    _AFTER_SIZE = (b"%011o\0" % TAR_MTIME + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC
                   + TAR_USER.encode().ljust(32, b"\0") * 2 + b"\0" * 16 + b"\0" * 155)  # dev numbers: NUL for files
    # Around the checksum ("%06o\0", 7 bytes, at 148): the mtime field before it; after it, the rest of
    # _AFTER_SIZE (from the checksum field's 8th byte, a space) padded to the block.
    _BEFORE_CHECKSUM = b"%011o\0" % TAR_MTIME
    _AFTER_CHECKSUM = _AFTER_SIZE[len(_BEFORE_CHECKSUM) + 7:].ljust(tarfile.BLOCKSIZE - 155, b"\0")
    _FIXED_SUM = sum(_MODE_IDS) + sum(_AFTER_SIZE)

    def __init__(self, f):
        self.f = f
        self.offset = 0
        self.sha = hashlib.sha256()
        self.lines: list[str] = []
        self.flushed = 0  # bytes handed to the kernel's writeback so far
        try:
            self.fd: int | None = f.fileno()
        except (AttributeError, OSError):  # an in-memory file
            self.fd = None

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.offset += len(data)
        if self.fd is not None and self.offset - self.flushed >= WRITEBACK_BYTES:
            self.f.flush()
            start_writeback(self.fd, self.flushed, self.offset - self.flushed)
            self.flushed = self.offset

    def header(self, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8")
        if len(encoded) > 100:  # USTAR's prefix/name split: leave it to tarfile
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
            info.uname = info.gname = TAR_USER
            return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        size_field = b"%011o\0" % size
        # The checksum is the sum of the header's bytes (its own field as spaces): the fixed fields'
        # part is a constant, so only the name and the size are summed (a sum over 512 bytes per
        # member was half of the writer's time).
        checksum = self._FIXED_SUM + sum(encoded) + sum(size_field)
        return (encoded.ljust(100, b"\0") + self._MODE_IDS + size_field + self._BEFORE_CHECKSUM
                + b"%06o\0" % checksum + self._AFTER_CHECKSUM)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: `key.ext` for each member, in sorted extension order (one write, one hash
        update per sample: per member they cost more than the headers)."""
        parts, entries, offset = [], [], self.offset
        for ext in sorted(members):
            data, name = members[ext], f"{key}.{ext}"
            parts.append(self.header(name, len(data)))
            offset += len(parts[-1])
            entries.append(f"{ext} {offset} {len(data)} {name}")
            pad = -len(data) % tarfile.BLOCKSIZE
            parts += (data, b"\0" * pad)
            offset += len(data) + pad
        self._write(b"".join(parts))
        self.lines.append(" ".join(entries))

    def close(self) -> tuple[str, int, str]:
        """End the archive as tarfile does (two zero blocks, zeros to a whole record); returns
        (sha256, size in bytes, DALI index text)."""
        self._write(tar_trailer(self.offset))
        index = f"{IDX_VERSION} {len(self.lines)}\n" + "".join(line + "\n" for line in self.lines)
        return self.sha.hexdigest(), self.offset, index


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample: `key.ext` for each member, in sorted extension order, fixed metadata."""
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime, info.mode = TAR_MTIME, TAR_MODE
        info.uname = info.gname = TAR_USER
        tar.addfile(info, io.BytesIO(data))


def dali_index(tar_path: str | Path) -> str:
    """The DALI webdataset index of a tar, as DALI's tools/wds2idx.py writes it."""
    bundles: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            # wds2idx splits at the first dot after the last '/': "dir/a.b.c" -> ("dir/a", "b.c")
            dot = m.name.find(".", m.name.rfind("/") + 1)
            base, ext = m.name[:dot], m.name[dot + 1:]
            if not base or base.endswith("/"):
                continue
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if base != last:
                bundles.append([entry])
                last = base
            else:
                bundles[-1].append(entry)
    return f"{IDX_VERSION} {len(bundles)}\n" + "".join(" ".join(b) + "\n" for b in bundles)


def completed_stats(shards_dir: str | Path, index: int, fingerprint: str, *, verify: bool = True,
                    listing: dict[str, int] | None = None) -> dict | None:
    """The stats of a finished shard of this build, or None when it must be (re)written.

    Finished means: the stats JSON exists and belongs to this build, and (when it has samples) the
    tar exists with the recorded size (and, locally with `verify`, sha256) and the index and sidecar
    exist. `listing` ({file name: size} of the folder, from `list_sizes`) saves a request per file
    on object storage; there the sha256 is not re-read (it would mean downloading every tar), the
    size and the commit order stand for it.
    """
    shards = str(shards_dir)
    stem = shard_stem(index)
    sizes = listing if listing is not None else None
    if sizes is not None and f"{stem}.json" not in sizes:
        return None
    try:
        stats = json.loads(read_bytes(storage.join(shards, f"{stem}.json")).decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    if stats.get("fingerprint") != fingerprint:
        return None
    if stats["samples"]:
        if sizes is None:
            sizes = _sizes_of(shards, [f"{stem}.tar", f"{stem}.idx", f"{stem}{sidecar.SUFFIX}"])
        if sizes.get(f"{stem}.tar") != stats["bytes"]:
            return None
        if f"{stem}.idx" not in sizes or f"{stem}{sidecar.SUFFIX}" not in sizes:
            return None
        if verify and not storage.is_remote(shards) and sha256_file(Path(shards) / f"{stem}.tar") != stats["sha256"]:
            return None
    return stats


def _sizes_of(folder: str, names: list[str]) -> dict[str, int]:
    fs, path = storage.filesystem(folder)
    out = {}
    for n in names:
        try:
            out[n] = int(fs.info(f"{path}/{n}")["size"])
        except FileNotFoundError:
            pass
    return out


def list_sizes(folder: str, prefix: str = "") -> dict[str, int]:
    """{file name: size} of the files directly in `folder` (local or remote), optionally by name prefix."""
    if not storage.is_remote(folder):
        try:
            return {e.name: e.stat().st_size for e in os.scandir(folder) if e.name.startswith(prefix) and e.is_file()}
        except FileNotFoundError:
            return {}
    fs, path = storage.filesystem(folder)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
            if e.get("type") == "file" and e["name"].rsplit("/", 1)[-1].startswith(prefix)}
