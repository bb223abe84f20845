"""Fixtures for the dedup tests: skip when the real images are absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from dedup_images import IG_IMAGES, IMAGENETTE_VAL, SHARED_DATA


@pytest.fixture(scope="session")
def real_images() -> Path:
    if not IG_IMAGES.is_dir() or not IMAGENETTE_VAL.is_dir():
        pytest.skip(f"real images not found at {IG_IMAGES} / {IMAGENETTE_VAL}")
    return SHARED_DATA
