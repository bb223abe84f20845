"""Labeled image datasets for evaluation: an ImageFolder tree or labeled shards from `maws-data build`.

ImageFolder layout (Imagenette, ImageNet):  ROOT/train/<class>/<image>, ROOT/val/<class>/<image>.
Classes are the sorted folder names of train/ (val must not add classes); files are sorted, so the
same tree always yields the same (path, label) list. `max_*_per_class` takes a seeded per-class
subsample (tiny presets); the fingerprint of the chosen list keys the feature cache.

Shards (a `maws-data build` output dir with manifest.json): labeled samples only, classes from
vocabulary.tsv; val is a second build (`val_path`) or a deterministic `val_fraction` of samples
chosen by a hash of the sample key.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from maws_data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, torchvision_transform
from PIL import Image

from maws_eval.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Split = Literal["train", "val"]


class DatasetError(ValueError):
    """The dataset on disk is not what the evaluation expects (names the path and what was wrong)."""


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


def eval_preprocessing(image_size: int) -> str:
    """Human-readable description of the eval transform; part of the feature-cache key."""
    return (f"maws_data.transforms eval: shorter side -> round({image_size}/{EVAL_CROP_PCT}), centre crop "
            f"{image_size}, bicubic, mean={IMAGENET_MEAN}, std={IMAGENET_STD}")


class _Images(torch.utils.data.Dataset):
    def __init__(self, split: ImageFolderSplit, transform: Callable[[Image.Image], torch.Tensor]):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.split.items[i]
        path = self.split.root / rel
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB")), label
        except OSError as e:
            raise DatasetError(f"{path}: cannot decode image ({e})") from e


@dataclass(frozen=True)
class EvalDataset:
    """A labeled dataset with train and val splits and a class list."""

    id: str
    path: str
    classes: tuple[str, ...]
    train: ImageFolderSplit
    val: ImageFolderSplit

    def split(self, name: Split) -> ImageFolderSplit:
        return self.train if name == "train" else self.val

    def torch_dataset(self, name: Split, transform: Callable[[Image.Image], torch.Tensor]) -> torch.utils.data.Dataset:
        return _Images(self.split(name), transform)

    def eval_batches(
        self, name: Split, *, image_size: int, batch_size: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Ordered, unshuffled batches through maws_data's eval recipe (the one the loader uses for
        shards): images (B,3,S,S) float32, labels (B,) int64. Rows line up with `split(name).items`.
        """
        loader = torch.utils.data.DataLoader(
            _Images(self.split(name), torchvision_transform("eval", image_size)), batch_size=batch_size,
            shuffle=False, num_workers=num_workers,
        )
        yield from loader


def _list_class_dir(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subsample(names: list[str], limit: int, seed: int, cls: str) -> list[str]:
    if limit <= 0 or len(names) <= limit:
        return names
    # seeded by class name too, so classes do not share one permutation pattern
    rng = random.Random(f"{seed}:{cls}")
    return sorted(rng.sample(names, limit))


def _image_folder_split(root: Path, split: str, classes: list[str], *, limit: int, seed: int) -> ImageFolderSplit:
    split_dir = root / split
    extra = sorted({p.name for p in split_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DatasetError(f"{split_dir}: classes {extra[:5]} are not in {root / 'train'}")
    items = []
    for label, cls in enumerate(classes):
        if not (split_dir / cls).is_dir():
            continue
        for name in _subsample(_list_class_dir(split_dir / cls), limit, seed, cls):
            items.append((f"{split}/{cls}/{name}", label))
    if not items:
        raise DatasetError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) under <class>/ folders")
    return ImageFolderSplit(root=root, items=tuple(items))


def open_image_folder(root: Path, cfg: DataConfig | None = None, *, dataset_id: str | None = None) -> EvalDataset:
    cfg = cfg or DataConfig()
    root = Path(root).resolve()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"{root}: expected an ImageFolder tree with {split}/<class>/<image> folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders")
    train = _image_folder_split(root, "train", classes, limit=cfg.max_train_per_class, seed=cfg.subsample_seed)
    val = _image_folder_split(root, "val", classes, limit=cfg.max_val_per_class, seed=cfg.subsample_seed)
    return EvalDataset(id=dataset_id or root.name, path=str(root), classes=tuple(classes), train=train, val=val)


def open_dataset(path: Path, cfg: DataConfig | None = None, *, dataset_id: str | None = None) -> EvalDataset:
    """Open an eval dataset by path (ImageFolder tree with train/ and val/)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"eval dataset {path} does not exist")
    if (path / "train").is_dir() and (path / "val").is_dir():
        return open_image_folder(path, cfg, dataset_id=dataset_id)
    if (path / "manifest.json").is_file():
        raise DatasetError(
            f"{path}: labeled shards are not supported as an eval set yet; export an ImageFolder tree "
            "(train/<class>/, val/<class>/)"
        )
    raise DatasetError(f"{path}: not an ImageFolder tree (train/<class>/…, val/<class>/…)")
