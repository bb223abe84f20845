"""Frozen features: extract once per (encoder, dataset, preprocessing), cache on disk, reuse.

Cache key = sha256 of
  - the encoder's weights file bytes (so retraining into the same path invalidates the cache),
  - the split's fingerprint (chosen files, labels and sizes — see datasets.ImageFolderSplit),
  - the preprocessing description (transform repr incl. image size and mean/std).
File: CACHE_DIR/<key>.safetensors with tensors "x" (N, D) float32 and "y" (N,) int64, plus the key
parts in the safetensors metadata. Written to a temp file and renamed: never half a cache file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

Features = tuple[torch.Tensor, torch.Tensor]


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached(parts: dict[str, str], cache_dir: Path | None, compute: Callable[[], Features]) -> Features:
    """Return the cached (x, y) for `parts`, calling `compute` only on a miss (or with no cache dir)."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{cache_key(parts)}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return tensors["x"], tensors["y"]
    x, y = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"x": x.contiguous(), "y": y.contiguous()}, tmp, metadata=parts)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return x, y


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()  # not inference_mode: the probes later use these tensors under autograd
def extract(
    encoder: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
    device: torch.device | None = None, total: int | None = None, desc: str = "features",
) -> Features:
    """Run a frozen encoder over (images (B,3,H,W), labels (B,)) batches → x (N, D) float32, y (N,) int64."""
    device = device or pick_device()
    encoder = encoder.eval().to(device)
    xs, ys = [], []
    for images, labels in tqdm(batches, total=total, desc=desc, leave=False, disable=None):
        # bf16 autocast on GPU halves the memory traffic; features are stored as float32 either way
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = encoder(images.to(device, non_blocking=True))
        if feats.ndim != 2:
            raise ValueError(f"encoder returned shape {tuple(feats.shape)}; expected (batch, dim) pooled features")
        xs.append(feats.float().cpu())
        ys.append(torch.as_tensor(labels, dtype=torch.int64))
    if not xs:
        raise ValueError(f"{desc}: no batches to extract features from")
    return torch.cat(xs), torch.cat(ys)
