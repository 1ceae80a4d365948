from __future__ import annotations

import pytest

from diffattr.data import ImageDataset, load_digits


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return load_digits()
