"""Shared fixtures: the real test data (`shared_data`) and one tiny real build (`tiny_build`).

`tiny_build` is the first 60 rows of ../shared/data/instagram/captions.parquet built with
image_size 64, shard_size 16 (shards of 16, 16, 16 and 12 rows) and min_count 2: the loader, train
and eval tests read it. It is built once per test session (~10-20 s, mostly loading WordNet).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INSTAGRAM = SHARED_DATA / "instagram"
CAPTIONS = INSTAGRAM / "captions.parquet"
NLTK_DATA = SHARED_DATA / "nltk_data"

TINY_ROWS = 60
TINY_IMAGE_SIZE = 64
TINY_SHARD_SIZE = 16
TINY_MIN_COUNT = 2

# WordNet offline: nltk reads NLTK_DATA when it is imported, so set it before any test imports it.
if NLTK_DATA.is_dir():
    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (skips the test when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_tiny_source(folder: Path, rows: int = TINY_ROWS) -> Path:
    """The first `rows` rows of the real captions table as `folder/captions.parquet`, with
    `folder/images` linked to the real images so that the relative image paths still resolve."""
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "images"
    if not link.exists():
        link.symlink_to(INSTAGRAM / "images", target_is_directory=True)
    path = folder / "captions.parquet"
    pl.read_parquet(CAPTIONS).head(rows).write_parquet(path)
    return path


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """Path of the tiny source parquet (60 real rows, relative image paths resolvable)."""
    if not CAPTIONS.is_file() or not NLTK_DATA.is_dir():
        pytest.skip(f"real data not found at {INSTAGRAM} / {NLTK_DATA}")
    return write_tiny_source(tmp_path_factory.mktemp("tiny_source"))


@pytest.fixture(scope="session")
def tiny_build(tiny_source, tmp_path_factory) -> Path:
    """Output folder of a real `maws_data.build.build` over the tiny source (see module docstring)."""
    from maws_data.build import BuildConfig, build

    out = tmp_path_factory.mktemp("tiny_build") / "build"
    cfg = BuildConfig(source=str(tiny_source), out=str(out), image_size=TINY_IMAGE_SIZE,
                      shard_size=TINY_SHARD_SIZE, min_count=TINY_MIN_COUNT, decoder="pil", processes=1,
                      progress=False)
    return build(cfg)
