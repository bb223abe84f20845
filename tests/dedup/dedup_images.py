"""Real images and their injected variants for the dedup tests (docs/dedup.md defines the variants).
Imported by the tests as `dedup_images` (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, ImageOps

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IG_IMAGES = SHARED_DATA / "instagram" / "images"
IMAGENETTE_VAL = SHARED_DATA / "imagenette" / "val"
VARIANTS = ("exact", "q50", "half", "crop", "gray", "flip")


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_variant(data: bytes, kind: str) -> bytes:
    """exact copy, JPEG q50, 0.5x, 5% cut off each side (the 10% border crop), grayscale, mirror."""
    if kind == "exact":
        return data
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    return {"q50": lambda: _jpeg(im, 50),
            "half": lambda: _jpeg(im.resize((w // 2, h // 2), Image.Resampling.BICUBIC)),
            "crop": lambda: _jpeg(im.crop((round(0.05 * w), round(0.05 * h), w - round(0.05 * w), h - round(0.05 * h)))),
            "gray": lambda: _jpeg(im.convert("L")),
            "flip": lambda: _jpeg(ImageOps.mirror(im))}[kind]()


def distinct_photos(n: int) -> list[Path]:
    """The first n Instagram photos (sorted) whose bytes appear once in the sample and that have no
    known repost in it (docs/dedup.md lists the reposts): distinct images."""
    reposts = {"0729ed52", "5b5f0e26", "f4db5ca2", "f52a1e70", "f92b8207", "5d2044f6", "8baf89bb",
               "692396f9", "f40d3ada", "7e0f37aa", "c2f61083"}
    files = sorted(IG_IMAGES.glob("*.jpg"))
    digests: dict[str, int] = {}
    for f in files:
        d = hashlib.sha256(f.read_bytes()).hexdigest()
        digests[d] = digests.get(d, 0) + 1
    out = [f for f in files if f.name[:8] not in reposts
           and digests[hashlib.sha256(f.read_bytes()).hexdigest()] == 1]
    return out[:n]
