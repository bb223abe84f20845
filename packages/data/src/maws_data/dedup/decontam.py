"""Eval-set decontamination: index an eval set's images as perceptual hashes, find training samples
within a Hamming threshold of any of them.

    index = EvalIndex.build(["../shared/data/imagenette"])     # ImageFolder trees or flat folders
    ids, dist = index.match(phashes, threshold=6)              # per training hash: eval image or -1
    report = decontaminate("data/ig", ["../shared/data/imagenette"], threshold=6)   # an existing build

Each eval image is indexed under 4 hashes (hashes.eval_hashes: full, mirror, centre crop, mirrored
crop), so training copies that are mirrored or have a border cut off are caught while the training
side keeps one hash per sample. `match` uses an in-memory multi-index (mih.MultiIndex): one
`searchsorted` per table per batch of training hashes.

`decontaminate` reads an existing build through its manifest and each shard's sidecar: the stored
phashes (sidecar version 2, every build since the builder hashes its samples), else the offsets of
KEY.jpg in the tar (or the tar itself) to decode and hash every stored JPEG (older builds).

Memory: the index, O(4 x eval images x tables); one shard's samples at a time.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maws_data import sidecar, storage
from maws_data.dedup.hashes import eval_hashes, open_image, phash_bytes
from maws_data.dedup.mih import MultiIndex
from maws_data.manifest import read_manifest

EVAL_THRESHOLD = 6  # default for decontamination (docs/dedup.md: 100% of every variant, 0 false matches)
REASON = "eval_contaminated"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIEWS = ("full", "mirror", "crop", "mirror_crop")


class DecontamError(Exception):
    """A problem the user can fix (a missing folder, a folder with no images, not a build)."""


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root` (ImageFolder tree or flat folder), recursively, sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise DecontamError(f"{root}: no such file or folder")
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise DecontamError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _hash_file(path: Path) -> tuple[int, ...] | None:
    try:
        return eval_hashes(open_image(path.read_bytes()))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


@dataclass
class EvalIndex:
    """The eval images of one or more folders: names (`folder/relative path`) and 4 hashes each."""

    files: list[str]
    hashes: np.ndarray  # (n, 4) uint64, VIEWS order
    unreadable: list[str] = field(default_factory=list)
    _index: dict[int, MultiIndex] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, paths: Sequence[str | Path], *, threads: int = 8) -> EvalIndex:
        files = [f for p in paths for f in list_images(p)]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
            hashed = list(pool.map(_hash_file, files))
        ok = [i for i, h in enumerate(hashed) if h is not None]
        return cls(files=[str(files[i]) for i in ok],
                   hashes=np.array([hashed[i] for i in ok], np.uint64).reshape(-1, len(VIEWS)),
                   unreadable=[str(f) for f, h in zip(files, hashed) if h is None])

    def __len__(self) -> int:
        return len(self.files)

    def match(self, phashes: np.ndarray | Sequence[int], threshold: int = EVAL_THRESHOLD
              ) -> tuple[np.ndarray, np.ndarray]:
        """Per training phash: (index into `files` of the nearest eval image within threshold, distance),
        (-1, -1) when none. Ties go to the first file in index order."""
        if threshold not in self._index:
            ids = np.repeat(np.arange(len(self.files)), len(VIEWS))
            self._index[threshold] = MultiIndex.build(self.hashes.reshape(-1), ids, threshold)
        return self._index[threshold].query(np.asarray(phashes, np.uint64))

    def save(self, path: str | Path) -> None:
        """An .npz the builder's workers load instead of re-hashing the eval set."""
        Path(path).write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The .npz bytes of `save` (the same index gives the same bytes: the builder's fingerprint)."""
        buf = io.BytesIO()
        np.savez(buf, files=np.array(self.files, dtype=str), hashes=self.hashes,
                 unreadable=np.array(self.unreadable, dtype=str))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> EvalIndex:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> EvalIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(files=z["files"].tolist(), hashes=z["hashes"], unreadable=z["unreadable"].tolist())


# --------------------------------------------------------------------------- an existing build


def shard_jpegs(build: str | Path, name: str) -> list[tuple[str, bytes]]:
    """(KEY, KEY.jpg bytes) of one shard of a build, in tar order: through the sidecar's offsets
    (ranged reads, so this works on s3:// and http:// builds), else by reading the whole tar."""
    tar_url = storage.join(str(build), name)
    fs, tar_path = storage.filesystem(tar_url)
    side_url = tar_url[: -len(".tar")] + sidecar.SUFFIX
    sfs, side_path = storage.filesystem(side_url)
    if sfs.exists(side_path):
        s = sidecar.decode(sfs.cat_file(side_path), side_url)
        out = []
        with fs.open(tar_path, "rb") as f:
            for key, off, size in zip(s.key, s.jpg_offset, s.jpg_size):
                f.seek(int(off))
                out.append((key.decode(), f.read(int(size))))
        return out
    with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        return [(m.name.split(".", 1)[0], tf.extractfile(m).read()) for m in tf
                if m.isreg() and m.name.split(".", 1)[-1] == "jpg"]


def stored_phashes(build: str | Path, name: str) -> tuple[list[str], np.ndarray] | None:
    """(KEYs, phashes) of one shard from its sidecar, when the build stored them (sidecar version 2)."""
    side_url = storage.join(str(build), name)[: -len(".tar")] + sidecar.SUFFIX
    fs, side_path = storage.filesystem(side_url)
    if not fs.exists(side_path):
        return None
    s = sidecar.decode(fs.cat_file(side_path), side_url)
    return None if s.phash is None else ([k.decode() for k in s.key], s.phash)


def decontaminate(build: str | Path, against: Sequence[str | Path], *, threshold: int = EVAL_THRESHOLD,
                  index: EvalIndex | None = None, threads: int = 8) -> dict:
    """Report how contaminated an existing build is: every sample within `threshold` of an eval image.

    {"build", "against", "threshold", "eval_images", "eval_unreadable", "samples", "contaminated",
     "by_eval_set": {folder: n}, "matches": [{"key", "shard", "eval_file", "distance"}],
     "hashed_shards": n} (shard order). Shards whose sidecar stores the builder's phashes are matched
    from those (no image is read); the others' JPEGs are decoded and hashed ("hashed_shards" counts them).
    """
    if not 0 <= threshold < 64:
        raise DecontamError(f"--threshold {threshold}: a Hamming distance between 64-bit hashes, 0 to 63")
    try:
        manifest = read_manifest(build)
    except (FileNotFoundError, ValueError) as e:
        raise DecontamError(str(e)) from None
    index = index or EvalIndex.build(against, threads=threads)
    matches, samples, hashed = [], 0, 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for shard in manifest["shards"]:
            try:
                stored = stored_phashes(build, shard["name"])
                if stored is None:
                    jpegs = shard_jpegs(build, shard["name"])
                    hashed += 1
                    stored = ([k for k, _ in jpegs],
                              np.array(list(pool.map(lambda kv: phash_bytes(kv[1]), jpegs)), np.uint64))
            except (OSError, tarfile.TarError, ValueError) as e:
                raise DecontamError(f"{storage.join(str(build), shard['name'])}: cannot read the shard ({e})") from None
            keys, hashes = stored
            samples += len(keys)
            ids, dist = index.match(hashes, threshold)
            for key, i, d in zip(keys, ids, dist):
                if i >= 0:
                    matches.append({"key": key, "shard": shard["name"], "eval_file": index.files[i], "distance": int(d)})
    by_set = {str(p): sum(m["eval_file"].startswith(os.path.join(str(p), "")) or m["eval_file"] == str(p)
                          for m in matches) for p in against}
    return {"build": str(build), "against": [str(p) for p in against], "threshold": threshold,
            "eval_images": len(index), "eval_unreadable": index.unreadable, "samples": samples,
            "contaminated": len(matches), "by_eval_set": by_set, "matches": matches, "hashed_shards": hashed}


def write_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


