from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError
from diffattr.methods import NDAConfig, nda_heatmaps
from diffattr.report import save_heatmap


def _images(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, 5, 6), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=first_id + 3 * np.arange(n), name=f"rand{seed}")


def test_save_heatmap_writes_a_png(tmp_path) -> None:
    train, queries = _images(3, 0, first_id=0), _images(1, 1, first_id=20)
    query_map, _ = nda_heatmaps(queries, train, 20, 3, NDAConfig(timesteps=(300,)))
    path = save_heatmap(queries.images[0], query_map, tmp_path / "sub" / "map.png", scale=4)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (6 * 4, 5 * 4)  # (width, height)
        assert image.mode == "RGB"
    save_heatmap(queries.images[0], np.zeros((5, 6)), tmp_path / "zero.png")
    with pytest.raises(DataError, match="shape"):
        save_heatmap(queries.images[0], np.zeros((6, 5)), tmp_path / "bad.png")
    with pytest.raises(ConfigError, match="scale"):
        save_heatmap(queries.images[0], query_map, tmp_path / "bad.png", scale=0)
