"""Labeled image datasets for evaluation: an ImageFolder tree or labeled shards from `maws-data build`.

ImageFolder layout (Imagenette, ImageNet):  ROOT/train/<class>/<image>, ROOT/val/<class>/<image>.
Classes are the sorted folder names of train/ that hold at least one image (empty class folders are
left out, with a note); val must have images for exactly those classes (a mismatch is an error that
names the folders). Files are sorted, so the same tree always yields the same (path, label) list.
`max_*_per_class` takes a seeded per-class subsample (tiny presets); the fingerprint of the chosen
list keys the feature cache.

Shards (a `maws-data build` output dir with manifest.json): labeled samples only (first label,
the `.cls` member), classes = vocabulary.tsv's wnids; val is a second build (`val_path`) or a
deterministic `val_fraction` of samples chosen by a hash of the sample key. Images are read by
byte range from the tars, through the same eval transform as ImageFolder images.

A file that cannot be decoded (corrupt, not an image, a decompression bomb over Pillow's pixel
limit) is a DatasetError naming it, also when it is read in a DataLoader worker process
(`EvalDataset.batches` carries the error back instead of letting torch wrap it in a traceback).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from maws_data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, torchvision_transform
from PIL import Image

from maws_eval.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Split = Literal["train", "val"]


class DatasetError(ValueError):
    """The dataset on disk is not what the evaluation expects (names the path and what was wrong)."""


# What Pillow raises on a bad file: OSError (incl. UnidentifiedImageError, truncated data), the
# decompression-bomb check (not an OSError), and what broken headers raise from plugins' decoders.
_DECODE_ERRORS = (OSError, Image.DecompressionBombError, ValueError, SyntaxError, struct.error)


def decode(source: Path | io.BytesIO, where: str) -> Image.Image:
    """Open, fully decode and convert an image to RGB; any failure is a DatasetError naming `where`."""
    try:
        with Image.open(source) as im:
            return im.convert("RGB")  # decodes, and a mode Pillow cannot convert fails here, named
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{where}: refused as a decompression bomb ({e}); remove or shrink this file") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{where}: cannot decode image ({type(e).__name__}: {e}); remove or replace this file") from None


@dataclass(frozen=True)
class ImageFolderSplit:
    """One split as an explicit (path, label) list."""

    root: Path
    items: tuple[tuple[str, int], ...]  # (path relative to root, label)

    def fingerprint(self) -> str:
        """sha256 over the chosen files (relative path, label, byte size): changes when the data do."""
        h = hashlib.sha256()
        for rel, label in self.items:
            h.update(f"{rel}\t{label}\t{(self.root / rel).stat().st_size}\n".encode())
        return h.hexdigest()

    def open_image(self, i: int) -> Image.Image:
        """Item i as an RGB image (DatasetError naming the file if it cannot be decoded)."""
        path = self.root / self.items[i][0]
        return decode(path, str(path))


@dataclass(frozen=True)
class ShardSplit:
    """Labeled samples of `maws-data build` shards, read by byte range (a WebDataset tar is a plain tar).

    Item refs are "shards/shard-000000.tar:OFFSET:SIZE:KEY" (the sample's .jpg member); the label is
    the sample's `.cls` (its first label in vocabulary order).
    """

    root: Path
    items: tuple[tuple[str, int], ...]
    shard_sha256: tuple[tuple[str, str], ...] = ()  # (tar, sha256 from its stats json)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for tar, sha in self.shard_sha256:
            h.update(f"{tar}\t{sha}\n".encode())
        for ref, label in self.items:
            h.update(f"{ref}\t{label}\n".encode())
        return h.hexdigest()

    def open_image(self, i: int) -> Image.Image:
        tar, offset, size, key = self.items[i][0].split(":", 3)
        with open(self.root / tar, "rb") as f:
            f.seek(int(offset))
            data = f.read(int(size))
        return decode(io.BytesIO(data), f"{self.root / tar}: sample {key} (.jpg)")


def eval_preprocessing(image_size: int) -> str:
    """Human-readable description of the eval transform; part of the feature-cache key."""
    return (f"maws_data.transforms eval: shorter side -> round({image_size}/{EVAL_CROP_PCT}), centre crop "
            f"{image_size}, bicubic, mean={IMAGENET_MEAN}, std={IMAGENET_STD}")


@dataclass(frozen=True)
class _Failed:
    """A DatasetError message travelling from a DataLoader worker to the main process as data."""

    message: str


class _Images(torch.utils.data.Dataset):
    def __init__(self, split: ImageFolderSplit | ShardSplit, transform: Callable[[Image.Image], torch.Tensor]):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | _Failed:
        try:
            with self.split.open_image(i) as im:
                return self.transform(im), self.split.items[i][1]
        except DatasetError as e:  # returned, not raised: torch would re-raise it as "Caught ... in worker" + traceback
            return _Failed(str(e))


def _collate(samples: list) -> Any:
    failed = next((s for s in samples if isinstance(s, _Failed)), None)
    return failed if failed is not None else torch.utils.data.default_collate(samples)


@dataclass(frozen=True)
class EvalDataset:
    """A labeled dataset with train and val splits and a class list."""

    id: str
    path: str  # as the user gave it (reports print this); the splits' roots are resolved
    classes: tuple[str, ...]
    train: ImageFolderSplit | ShardSplit
    val: ImageFolderSplit | ShardSplit
    skipped: dict[str, int] = field(default_factory=dict)  # shards: samples left out, by reason
    notes: tuple[str, ...] = ()  # what was adjusted while reading the tree (empty class folders left out)

    def split(self, name: Split) -> ImageFolderSplit | ShardSplit:
        return self.train if name == "train" else self.val

    def batches(self, name: Split, transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int,
                num_workers: int, shuffle: bool = False, drop_last: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass of (images, labels) batches; a file that fails to decode raises DatasetError naming it,
        in this process, whatever `num_workers` is."""
        loader = torch.utils.data.DataLoader(
            _Images(self.split(name), transform), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            num_workers=num_workers, generator=generator, collate_fn=_collate,
        )
        for batch in loader:
            if isinstance(batch, _Failed):
                raise DatasetError(batch.message)
            yield batch

    def num_batches(self, name: Split, *, batch_size: int, drop_last: bool = False) -> int:
        n = len(self.split(name).items)
        return n // batch_size if drop_last else -(-n // batch_size)

    def eval_batches(
        self, name: Split, *, image_size: int, batch_size: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Ordered, unshuffled batches through maws_data's eval recipe (the one the loader uses for
        shards): images (B,3,S,S) float32, labels (B,) int64. Rows line up with `split(name).items`.
        """
        yield from self.batches(name, torchvision_transform("eval", image_size), batch_size=batch_size,
                                num_workers=num_workers)


def _list_class_dir(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subsample(names: list[str], limit: int, seed: int, cls: str) -> list[str]:
    if limit <= 0 or len(names) <= limit:
        return names
    # seeded by class name too, so classes do not share one permutation pattern
    rng = random.Random(f"{seed}:{cls}")
    return sorted(rng.sample(names, limit))


def _image_folder_split(root: Path, split: str, classes: list[str], *, limit: int, seed: int) -> ImageFolderSplit:
    items = []
    for label, cls in enumerate(classes):
        for name in _subsample(_list_class_dir(root / split / cls), limit, seed, cls):
            items.append((f"{split}/{cls}/{name}", label))
    return ImageFolderSplit(root=root, items=tuple(items))


def _class_folders(split_dir: Path) -> tuple[list[str], list[str]]:
    """(class folders holding images, empty class folders) of one split, sorted."""
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    full = [c for c in folders if _list_class_dir(split_dir / c)]
    return full, [c for c in folders if c not in full]


def _classes(given: Path, root: Path) -> tuple[list[str], list[str]]:
    """The classes (train folders with images; val must have the same ones) and notes on what was left out."""
    train, train_empty = _class_folders(root / "train")
    val, _ = _class_folders(root / "val")  # empty val folders hold nothing to score
    if not train:
        raise DatasetError(f"{given / 'train'}: no images ({', '.join(IMAGE_EXTENSIONS)}) under <class>/ folders")
    notes = []
    if train_empty:
        notes.append(f"{given / 'train'}: left out {len(train_empty)} empty class folder(s) "
                     f"{', '.join(train_empty[:10])}: {len(train)} classes")
    only_val = [c for c in val if c not in train]
    if only_val:
        why = ", ".join(f"{c} ({'empty' if c in train_empty else 'absent'} in train/)" for c in only_val[:5])
        raise DatasetError(f"{given / 'val'}: classes with images in val/ but none in train/: {why}; "
                           "add train images or remove these val/ folders")
    only_train = [c for c in train if c not in val]
    if only_train:
        raise DatasetError(f"{given / 'val'}: no val images for train classes {', '.join(only_train[:10])}"
                           f"{' …' if len(only_train) > 10 else ''} ({len(only_train)} of {len(train)}); "
                           "add val/<class>/ images or remove these train/ folders")
    return train, notes


def _name(given: Path, resolved: Path) -> str:
    """The dataset id: the folder name as given (a symlink's own name), the real one for `.` and `..`."""
    return given.name if given.name not in ("", ".", "..") else resolved.name


def open_image_folder(root: Path, cfg: DataConfig | None = None, *, dataset_id: str | None = None) -> EvalDataset:
    cfg = cfg or DataConfig()
    given, root = Path(root), Path(root).resolve()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"{given}: expected an ImageFolder tree with {split}/<class>/<image> folders")
    classes, notes = _classes(given, root)
    train = _image_folder_split(root, "train", classes, limit=cfg.max_train_per_class, seed=cfg.subsample_seed)
    val = _image_folder_split(root, "val", classes, limit=cfg.max_val_per_class, seed=cfg.subsample_seed)
    return EvalDataset(id=dataset_id or _name(given, root), path=str(given), classes=tuple(classes), train=train,
                       val=val, notes=tuple(notes))


def _shard_samples(build: Path, skipped: Counter) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """[(key, ref, label)] of labeled samples in committed shards (stats .json present), and shard hashes."""
    shard_dir = build / "shards"
    samples, hashes = [], []
    for tar_path in sorted(shard_dir.glob("shard-*.tar")):
        stats_path = tar_path.with_suffix(".json")
        if not stats_path.is_file():
            skipped["uncommitted_shard"] += 1  # being written, or the build was interrupted
            continue
        hashes.append((tar_path.name, json.loads(stats_path.read_text()).get("sha256", "")))
        jpg: dict[str, tuple[int, int]] = {}
        cls: dict[str, int] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "jpg":
                    jpg[key] = (m.offset_data, m.size)
                elif ext == "cls":
                    cls[key] = int(tar.extractfile(m).read().decode().strip())  # type: ignore[union-attr]
        for key, (offset, size) in jpg.items():
            label = cls.get(key, -1)
            if label < 0:
                skipped["unlabeled"] += 1
                continue
            samples.append((key, f"shards/{tar_path.name}:{offset}:{size}:{key}", label))
    if not hashes:
        raise DatasetError(f"{shard_dir}: no committed shards (shard-*.tar with its .json stats)")
    return samples, hashes


def _in_val(key: str, fraction: float) -> bool:
    """Deterministic split by key hash: the same sample is always on the same side."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _limit_per_class(samples: list[tuple[str, str, int]], limit: int, seed: int) -> tuple[tuple[str, int], ...]:
    by_class: dict[int, list[tuple[str, str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[2], []).append(s)
    keep = []
    for label in sorted(by_class):
        rows = sorted(by_class[label])
        if 0 < limit < len(rows):
            rows = sorted(random.Random(f"{seed}:{label}").sample(rows, limit))
        keep.extend((ref, lab) for _, ref, lab in rows)
    return tuple(keep)


def open_shards(build: Path, cfg: DataConfig | None = None, *, val_build: Path | None = None,
                dataset_id: str | None = None) -> EvalDataset:
    """Labeled shards of a `maws-data build` as an eval set; classes are vocabulary.tsv's wnids.

    Val is `val_build` (a second build with the same vocabulary) or a `val_fraction` of the samples by
    key hash. Unlabeled samples are left out and counted in `skipped`.
    """
    from maws_data.vocab import Vocabulary

    cfg = cfg or DataConfig()
    given, build = Path(build), Path(build).resolve()
    vocab = Vocabulary.load(build)
    skipped: Counter = Counter()
    samples, hashes = _shard_samples(build, skipped)
    if val_build is not None:
        val_build = Path(val_build).resolve()
        if Vocabulary.load(val_build).wnids != vocab.wnids:
            raise DatasetError(f"{val_build}/vocabulary.tsv differs from {build}/vocabulary.tsv: labels would not match")
        train_s, (val_s, val_hashes) = samples, _shard_samples(val_build, skipped)
        val_root = val_build
    else:
        train_s = [s for s in samples if not _in_val(s[0], cfg.val_fraction)]
        val_s, val_hashes, val_root = [s for s in samples if _in_val(s[0], cfg.val_fraction)], hashes, build
    if not train_s or not val_s:
        raise DatasetError(f"{build}: {len(train_s)} labeled train / {len(val_s)} val samples; need both")
    train = ShardSplit(build, _limit_per_class(train_s, cfg.max_train_per_class, cfg.subsample_seed), tuple(hashes))
    val = ShardSplit(val_root, _limit_per_class(val_s, cfg.max_val_per_class, cfg.subsample_seed), tuple(val_hashes))
    return EvalDataset(id=dataset_id or _name(given, build), path=str(given), classes=vocab.wnids, train=train,
                       val=val, skipped=dict(skipped))


def open_dataset(path: Path, cfg: DataConfig | None = None, *, dataset_id: str | None = None,
                 val_path: Path | None = None) -> EvalDataset:
    """Open an eval dataset by path: an ImageFolder tree (train/, val/) or a `maws-data build` dir."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"eval dataset {path} does not exist")
    if (path / "manifest.json").is_file() and (path / "shards").is_dir():
        return open_shards(path, cfg, val_build=val_path, dataset_id=dataset_id)
    if val_path is not None:
        raise DatasetError(f"--val-data is for shard builds; {path} is read as an ImageFolder tree with its own val/")
    if (path / "train").is_dir() and (path / "val").is_dir():
        return open_image_folder(path, cfg, dataset_id=dataset_id)
    raise DatasetError(f"{path}: neither an ImageFolder tree (train/<class>/…, val/<class>/…) nor a maws-data "
                       "build (manifest.json + shards/)")
