from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.data import image_grid, save_grid, save_pngs, to_uint8
from diffattr.errors import DataError


def test_to_uint8_values_and_layout() -> None:
    images = torch.tensor([-1.0, 0.0, 1.0, 0.5, 2.0, -3.0]).reshape(1, 1, 2, 3)
    pixels = to_uint8(images)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (1, 2, 3, 1)
    assert pixels[0, :, :, 0].tolist() == [[0, 128, 255], [191, 255, 0]]
    rgb = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)]).unsqueeze(0)
    assert to_uint8(rgb)[0, 1, 1].tolist() == [0, 128, 255]


def test_to_uint8_rejects_bad_shapes() -> None:
    with pytest.raises(DataError, match="C in"):
        to_uint8(torch.zeros(1, 2, 4, 4))
    with pytest.raises(DataError, match="C in"):
        to_uint8(torch.zeros(4, 4))


def test_grid_layout() -> None:
    images = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 1, 8, 8).contiguous()
    grid = image_grid(images, pad=1, scale=2)  # 3 per row, 2 rows
    assert grid.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1, 1)
    assert grid.dtype == np.uint8
    expected = to_uint8(images)[:, 0, 0, 0]
    assert (grid[1:17, 1:17] == expected[0]).all()  # first image, top left
    assert (grid[18:34, 1:17] == expected[3]).all()  # fourth image starts the second row
    assert (grid[0] == 255).all()
    assert (grid[:, 17] == 255).all()
    assert (grid[18:34, 35:51] == 255).all()  # the unused sixth cell stays blank
    assert image_grid(images, nrow=5, pad=0).shape == (8, 40, 1)
    assert image_grid(images[:2], nrow=4, pad=0).shape == (8, 16, 1)


def test_grid_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="scale"):
        image_grid(torch.zeros(2, 1, 4, 4), scale=0)


def test_save_grid_writes_a_readable_png(tmp_path: Path) -> None:
    images = torch.zeros(4, 3, 8, 8)
    images[:, 0] = 1.0
    path = save_grid(images, tmp_path / "out" / "grid.png", nrow=2, scale=4)
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (2 * 33 + 1, 2 * 33 + 1)
        assert image.getpixel((1, 1)) == (255, 128, 128)
    gray = save_grid(torch.zeros(1, 1, 8, 8), tmp_path / "gray.png")
    with Image.open(gray) as image:
        assert image.mode == "L"
        assert image.size == (34, 34)


def test_save_pngs_round_trip(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    paths = save_pngs(images, tmp_path / "samples", ["first", "second.png"])
    assert [p.name for p in paths] == ["first.png", "second.png"]
    expected = to_uint8(images)
    for path, pixels in zip(paths, expected, strict=True):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), pixels)
    (gray_path,) = save_pngs(images[:1, :1], tmp_path, ["g"])
    with Image.open(gray_path) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), to_uint8(images[:1, :1])[0, ..., 0])


def test_save_pngs_rejects_bad_names(tmp_path: Path) -> None:
    images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(DataError, match="2 images"):
        save_pngs(images, tmp_path, ["only-one"])
    with pytest.raises(DataError, match="distinct"):
        save_pngs(images, tmp_path, ["a", "a.png"])
    with pytest.raises(DataError, match="plain file name"):
        save_pngs(images, tmp_path, ["a", "../b"])
