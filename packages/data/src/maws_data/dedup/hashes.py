"""Per-image hashes for deduplication: sha256 of the source bytes and a 64-bit perceptual hash.

    content_hash(source_bytes) -> "3a7bd3e2..."    sha256 hex of the bytes as fetched (exact duplicates)
    phash(image) -> int                              64-bit DCT hash of the decoded image (near duplicates)
    phash_pair(image) -> (hash, hash of its mirror)  same DCT, both orientations
    eval_hashes(image) -> 4 hashes                   full, mirror, centre crop, mirrored crop (eval indexes)
    dhash(image) -> int                              64-bit difference hash (measured against phash)
    hamming(a, b) -> distances                       popcount of XOR, vectorised over uint64 arrays

pHash (Zauner 2010, as in the `imagehash` package): luma, box-resized to 32x32, 2-D DCT-II, the 8x8
lowest frequencies, one bit per coefficient: above the median of the 64 or not. Bit i = 8*u + v
(u vertical, v horizontal frequency) is bit 63-i of the integer, so the hex reads row by row.
The builder calls it on the image it already decoded and resized, so hashing costs one luma
conversion, one resize to 32x32 and two 32x32 matrix products (tools/bench/dedup.py measures it).

Mirrors: a horizontal flip multiplies DCT coefficient (u, v) by (-1)^v, so the mirror's hash comes
from the same 64 coefficients at no extra cost (`phash_pair`); a plain pHash of a mirrored image is
~32 bits away from the original's (the odd-v half of the bits is re-thresholded after a sign flip).

Memory: O(one image).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageOps

HASH_SIZE = 8  # 8x8 = 64 bits
DCT_SIZE = 32  # pHash input side: 4x the hash side, as imagehash's highfreq_factor=4
CROP = 0.05  # eval_hashes' centre crop: this fraction cut off each side
# (-1)^v over the low 8x8 block: the sign change a horizontal flip makes to DCT coefficient (u, v).
_FLIP_SIGN = np.where(np.arange(HASH_SIZE) % 2, -1.0, 1.0)[None, :]


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D, so that D @ X @ D.T is the 2-D DCT of an n x n block."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


# Only the first 8 rows are needed: C_low = D[:8] @ X @ D[:8].T (8x32 @ 32x32 @ 32x8).
_DCT_LOW = _dct_matrix(DCT_SIZE)[:HASH_SIZE].astype(np.float32)


def content_hash(source_bytes: bytes) -> str:
    """sha256 hex digest of the source bytes (what the builder fetched, before decoding)."""
    return hashlib.sha256(source_bytes).hexdigest()


def pack_bits(bits: np.ndarray) -> int:
    """64 booleans (row-major 8x8) -> an int in [0, 2^64), first bit most significant."""
    return int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big")


def _luma(image: Image.Image | np.ndarray, size: tuple[int, int], box: tuple[float, ...] | None = None) -> np.ndarray:
    """The image (or its region `box`) as float32 luma (ITU-R 601, Pillow's "L"), box-resized to size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    # Resize first, then take luma: both are linear, so the order changes only rounding, and
    # Pillow-SIMD's RGB resize is ~3x faster than its 1-channel one (14 vs 43 us from 256x256).
    # BOX averages every source pixel into the grid: no aliasing, and the cheapest filter.
    small = image.resize(size, Image.Resampling.BOX, box=box)
    if small.mode != "L":
        small = small.convert("L")
    # through the raw bytes: np.asarray on a PIL image goes through its array interface, ~2x slower
    return np.frombuffer(small.tobytes(), np.uint8).reshape(size[1], size[0]).astype(np.float32)


def _low_dct(image: Image.Image | np.ndarray, box: tuple[float, ...] | None = None) -> np.ndarray:
    x = _luma(image, (DCT_SIZE, DCT_SIZE), box)
    return _DCT_LOW @ x @ _DCT_LOW.T


def _threshold(low: np.ndarray) -> int:
    flat = np.sort(low, axis=None)
    # The median of 64 values; np.median costs ~20 us of call overhead for these 64 floats.
    # With no ties exactly 32 bits are set, so Hamming distances between pHashes are even.
    return pack_bits(low > 0.5 * (flat[31] + flat[32]))


def phash(image: Image.Image | np.ndarray) -> int:
    """64-bit perceptual hash of a decoded image (PIL image, or HxW / HxWx3 uint8 array)."""
    return _threshold(_low_dct(image))


def phash_pair(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(phash of the image, phash of its horizontal mirror), from one DCT."""
    low = _low_dct(image)
    return _threshold(low), _threshold(low * _FLIP_SIGN)


def eval_hashes(image: Image.Image | np.ndarray, *, crop: float = CROP) -> tuple[int, int, int, int]:
    """The hashes an eval image is indexed under: (full, mirror, centre crop, mirrored centre crop).

    A training image matches the eval image when its plain phash is within the threshold of any of
    the four, so mirrored copies and copies with a border cut off (`crop` of each side, 5% by
    default: the "10% border crop" of docs/dedup.md) are caught although the training side stores one
    hash. Eval sets are small (10^4-10^5 images), so 4 hashes each cost nothing.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    w, h = image.size
    full = _low_dct(image)
    cut = _low_dct(image, (crop * w, crop * h, (1 - crop) * w, (1 - crop) * h))
    return (_threshold(full), _threshold(full * _FLIP_SIGN), _threshold(cut), _threshold(cut * _FLIP_SIGN))


def dhash(image: Image.Image | np.ndarray) -> int:
    """64-bit difference hash: luma at 9x8, one bit per horizontal neighbour pair (right > left)."""
    x = _luma(image, (HASH_SIZE + 1, HASH_SIZE))
    return pack_bits(x[:, 1:] > x[:, :-1])


def open_image(data: bytes, *, min_side: int = 256) -> Image.Image:
    """Decode image bytes for hashing: EXIF orientation applied (as the builder does), and large JPEGs
    decoded by libjpeg at a reduced scale (draft) that still leaves >= min_side pixels a side.
    256 keeps the hash within 2 bits of the builder's (measured on 400 Instagram photos: draft to
    >= 64 px moves it by up to 10 bits, >= 128 px by up to 2)."""
    im = Image.open(io.BytesIO(data))
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB", (min_side, min_side))
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB") if im.mode not in ("RGB", "L") else im


def phash_bytes(data: bytes) -> int:
    """phash of encoded image bytes (a stored shard JPEG, an eval image file)."""
    return phash(open_image(data))


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def to_hex(h: int) -> str:
    return f"{int(h):016x}"
