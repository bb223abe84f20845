"""Dedup hashes on real photos: which hash, which Hamming threshold, and what hashing costs.

    uv run python tools/bench/dedup.py                       # 500 Instagram + 500 Imagenette val sources
    uv run python tools/bench/dedup.py --sources 0 --sheet /tmp/fp.png   # all sources; a contact sheet of FPs

Test set: for each source photo (the first --sources Instagram photos and the first --sources
Imagenette val images, sorted by path), six variants written as new JPEG files:
  exact   the same bytes            q50    re-encoded at JPEG quality 50
  half    resized to 0.5x (bicubic) crop   5% cut off each side (10% of each dimension), kept centre
  gray    luma only (a grayscale JPEG)     flip   mirrored left-right
Negatives: every pair of distinct files among all 2,261 Instagram photos and all Imagenette val
images (byte-identical files are true duplicates and are left out of the negatives).

Every image (source or variant) is hashed as the builder will hash it: decoded, EXIF-oriented, RGB,
resized with the builder's rule (shorter side --image-size, never upscaled, bicubic), then pHash /
dHash of that in-memory image. The cost is measured in the same run on the same images: the
builder's per-image pass `maws_data.images.process_image` (decode + resize + JPEG encode) against
sha256 of the source bytes + the perceptual hash of the resized image.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from maws_data.dedup.hashes import content_hash, dhash, eval_hashes, hamming, phash, phash_pair
from maws_data.images import ImageConfig, process_image, target_size
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
VARIANTS = ("exact", "q50", "half", "crop", "gray", "flip")
THRESHOLDS = range(17)


def builder_image(data: bytes, image_size: int) -> Image.Image:
    """The decoded, oriented, RGB, resized image the builder holds before it encodes the sample."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    size = target_size(*im.size, image_size)
    return im if size == im.size else im.resize(size, Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_variant(data: bytes, kind: str) -> bytes:
    if kind == "exact":
        return data
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    if kind == "q50":
        return jpeg(im, 50)
    if kind == "half":
        return jpeg(im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC))
    if kind == "crop":
        dx, dy = round(0.05 * w), round(0.05 * h)
        return jpeg(im.crop((dx, dy, w - dx, h - dy)))
    if kind == "gray":
        return jpeg(im.convert("L"))
    if kind == "flip":
        return jpeg(ImageOps.mirror(im))
    raise ValueError(kind)


def hashes(datas: list[bytes], image_size: int) -> dict[str, np.ndarray]:
    """phash, phash of the mirror, dhash, sha256 per image."""
    ph, ev, dh, sha = [], [], [], []
    for d in datas:
        im = builder_image(d, image_size)
        ph.append(phash(im))
        ev.append(eval_hashes(im))
        dh.append(dhash(im))
        sha.append(content_hash(d))
    return {"phash": np.array(ph, np.uint64), "eval": np.array(ev, np.uint64).reshape(-1, 4),
            "dhash": np.array(dh, np.uint64), "sha": np.array(sha)}


def pair_distances(h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Hamming distance of every pair i < j of h, as a histogram-ready flat array (only pairs with keep)."""
    out = []
    for i in range(len(h) - 1):
        d = hamming(h[i], h[i + 1:])
        out.append(d[keep[i, i + 1:]] if keep is not None else d)
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def measure_cost(datas: list[bytes], image_size: int, repeat: int) -> dict[str, float]:
    """Median over `repeat` passes of the total seconds per image of each step, on the same images."""
    cfg = ImageConfig(image_size=image_size)
    ims = [builder_image(d, image_size) for d in datas]  # untimed: the builder has this image already
    steps = {"image_pass": lambda i: process_image(datas[i], cfg), "sha256": lambda i: content_hash(datas[i]),
             "phash": lambda i: phash(ims[i]), "phash_pair": lambda i: phash_pair(ims[i]),
             "dhash": lambda i: dhash(ims[i])}
    res: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for name, fn in steps.items():  # interleaved, so a load spike hits every step alike
            t = time.perf_counter()
            for i in range(len(datas)):
                fn(i)
            res[name].append((time.perf_counter() - t) / len(datas))
    return {k: float(np.median(v)) for k, v in res.items()}


def measure_lookup(rows: int, thresholds: tuple[int, ...]) -> dict[str, float]:
    """Seconds per row of the dedup passes (maws_data.dedup.table.dedup) over `rows` synthetic hashes
    (dedup_scale.py's generator), each near pass with the block plan of a 10^9-row build."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dedup_scale import random_phash
    from maws_data.dedup.mih import plan_blocks
    from maws_data.dedup.table import dedup, write_unit

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory(prefix="dedup_lookup_") as tmp:
        for start in range(0, rows, 100_000):
            r = np.arange(start, min(rows, start + 100_000))
            write_unit(tmp, f"u{start:010d}", rows=r, keys=np.char.add(b"r", r.astype("S12")),
                       sha256=rng.integers(0, 2**63, (len(r), 2), dtype=np.uint64), phash=random_phash(rng, len(r)))
        for name, kw in [("exact", {"mode": "exact"})] + [
                (f"near k={k}", {"mode": "near", "threshold": k, "blocks": plan_blocks(k, 10**9)}) for k in thresholds]:
            t = time.perf_counter()
            dedup(tmp, partition_records=1 << 20, spill_records=1 << 20, **kw)
            out[name] = (time.perf_counter() - t) / rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--sources", type=int, default=500, help="sources per dataset for the variants (0 = all)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="passes of the cost measurement")
    ap.add_argument("--lookup-rows", type=int, default=200_000, help="rows for the dedup-pass cost (0 = skip)")
    ap.add_argument("--threshold", type=int, default=None, help="list the false positives at this threshold")
    ap.add_argument("--sheet", type=Path, default=None, help="write a PNG contact sheet of those pairs")
    args = ap.parse_args()

    ig = sorted((args.data / "instagram" / "images").glob("*.jpg"))
    inet = sorted((args.data / "imagenette" / "val").glob("*/*"))
    files = ig + inet
    datas = [p.read_bytes() for p in files]
    n_ig = len(ig)
    print(f"{len(ig)} Instagram photos, {len(inet)} Imagenette val images, load {os.getloadavg()}")

    # --- cost, same images, same run
    cost = measure_cost(datas, args.image_size, args.repeat)
    base = cost["image_pass"]
    print(f"\ncost per image (median of {args.repeat} passes over {len(datas)} images):")
    for k, v in cost.items():
        print(f"  {k:10s} {v * 1e6:8.1f} us   {100 * v / base:5.1f} % of the image pass")
    for h in ("phash", "dhash"):
        print(f"  sha256 + {h}: {100 * (cost['sha256'] + cost[h]) / base:.1f} % of the image pass")
    print(f"  load after cost: {os.getloadavg()}")
    if args.lookup_rows:
        hashing = cost["sha256"] + cost["phash"]
        for name, v in measure_lookup(args.lookup_rows, (2, 4)).items():
            print(f"  dedup pass {name:9s} {v * 1e6:6.1f} us/row   sha256 + phash + this pass: "
                  f"{100 * (hashing + v) / base:5.1f} % of the image pass")
        print(f"  load after the dedup passes: {os.getloadavg()}")

    # --- hashes of the whole sample
    t = time.perf_counter()
    H = hashes(datas, args.image_size)
    print(f"\nhashed {len(datas)} images in {time.perf_counter() - t:.1f} s")
    sha = H["sha"]
    same_bytes = sha[:, None] == sha[None, :]
    groups = {}
    for i, s in enumerate(sha):
        groups.setdefault(s, []).append(i)
    dup_groups = [g for g in groups.values() if len(g) > 1]
    print(f"byte-identical groups: {len(dup_groups)} ({sum(len(g) - 1 for g in dup_groups)} files that repeat another)")
    for g in dup_groups:
        print("   ", [files[i].name for i in g], "phash distance", int(hamming(H["phash"][g[0]], H["phash"][g[1]])))

    # --- variants
    n = args.sources or max(n_ig, len(inet))
    src = list(range(min(n, n_ig))) + list(range(n_ig, n_ig + min(n, len(inet))))
    t = time.perf_counter()
    var = {kind: hashes([make_variant(datas[i], kind) for i in src], args.image_size) for kind in VARIANTS}
    print(f"{len(src)} sources x {len(VARIANTS)} variants hashed in {time.perf_counter() - t:.1f} s")
    pos = {}
    for hname in ("phash", "dhash"):
        for kind in VARIANTS:
            pos[hname, kind] = hamming(H[hname][src], var[kind][hname])
    # Mirror-indexed: the eval side also stores the hash of its mirror (phash_pair); a training image
    # matches when it is within the threshold of either.
    # Eval-indexed (decontamination): the eval side is indexed under eval_hashes (full, mirror, crop,
    # mirrored crop); a training image matches when its phash is within k of any of the four.
    for kind in VARIANTS:
        pos["phash", kind + "*"] = hamming(H["eval"][src], var[kind]["phash"][:, None]).min(axis=1)

    # --- negatives: all pairs of distinct files (upper triangle, byte-identical pairs excluded)
    not_same = ~same_bytes
    neg = {h: pair_distances(H[h], not_same) for h in ("phash", "dhash")}
    ig_mask = np.zeros((len(files), len(files)), bool)
    ig_mask[:n_ig, :n_ig] = True
    neg_ig = pair_distances(H["phash"], not_same & ig_mask)
    print(f"negative pairs: {len(neg['phash'])} (Instagram only: {len(neg_ig)})")
    # Eval-indexed negatives: Instagram photo (training side, phash) against every Imagenette val
    # image's 4 eval hashes -- the false-contamination rate of decontaminating against Imagenette.
    cross = hamming(H["eval"][None, n_ig:, :], H["phash"][:n_ig, None, None]).min(axis=2)
    print(f"Instagram x Imagenette-val pairs (eval-indexed): {cross.size}")

    print("\nphash, eval-indexed (decontamination): recall per variant, false matches among Instagram x Imagenette")
    kinds = [v + "*" for v in VARIANTS]
    print("| k | " + " | ".join(kinds) + " | false matches | rate/pair |")
    print("|---:|" + "---:|" * (len(kinds) + 2))
    for k in THRESHOLDS:
        fp = int((cross <= k).sum())
        print(f"| {k} | " + " | ".join(f"{100 * float((pos['phash', kind] <= k).mean()):.1f}" for kind in kinds)
              + f" | {fp} | {fp / cross.size:.2e} |")
    for hname in ("phash", "dhash"):
        kinds = list(VARIANTS)
        print(f"\n{hname}: recall per variant ({len(src)} sources), false-positive pairs among "
              f"{len(neg[hname])} distinct pairs, precision over the 5 non-flip variants")
        print("| k | " + " | ".join(kinds) + " | FP pairs | FP rate/pair | precision |")
        print("|---:|" + "---:|" * (len(kinds) + 3))
        for k in THRESHOLDS:
            rec = [float((pos[hname, kind] <= k).mean()) for kind in kinds]
            tp = sum(int((pos[hname, kind] <= k).sum()) for kind in ("exact", "q50", "half", "crop", "gray"))
            fp = int((neg[hname] <= k).sum())
            print(f"| {k} | " + " | ".join(f"{100 * r:.1f}" for r in rec)
                  + f" | {fp} | {fp / len(neg[hname]):.2e} | {100 * tp / max(1, tp + fp):.2f} |")
        for kind in [*kinds, *(k + "*" for k in kinds if hname == "phash")]:
            d = pos[hname, kind]
            print(f"  {kind}: distance median {np.median(d):.0f}, p95 {np.percentile(d, 95):.0f}, max {d.max()}")

    if args.threshold is not None:
        k = args.threshold
        ph = H["phash"]
        pairs = []
        for i in range(len(ph) - 1):
            d = hamming(ph[i], ph[i + 1:])
            for j in np.flatnonzero((d <= k) & not_same[i, i + 1:]):
                pairs.append((i, i + 1 + int(j), int(d[j])))
        print(f"\npairs of distinct files within {k} (phash):")
        for i, j, d in pairs:
            print(f"  d={d:2d}  {files[i].relative_to(args.data)}  {files[j].relative_to(args.data)}")
        if args.sheet and pairs:
            write_sheet(args.sheet, [(files[i], files[j], d) for i, j, d in pairs])
            print(f"contact sheet: {args.sheet}")
    print(f"\nload at end: {os.getloadavg()}")


def write_sheet(path: Path, pairs: list[tuple[Path, Path, int]], side: int = 160) -> None:
    """One row per pair: the two images side by side (to look at the false positives)."""
    from PIL import ImageDraw

    sheet = Image.new("RGB", (2 * side + 40, side * len(pairs)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (a, b, d) in enumerate(pairs):
        for c, p in enumerate((a, b)):
            im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
            im.thumbnail((side, side))
            sheet.paste(im, (c * side, r * side))
        draw.text((2 * side + 4, r * side + 4), f"d={d}", fill="black")
    sheet.save(path)


if __name__ == "__main__":
    main()
