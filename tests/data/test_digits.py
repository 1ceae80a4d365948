from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets
import torch

from diffattr.data import ImageDataset, load_digits
from diffattr.errors import DataError


def test_digits_shape_range_ids_and_labels(digits: ImageDataset) -> None:
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert digits.images.is_contiguous()
    assert (digits.channels, digits.image_size, len(digits)) == (1, (8, 8), 1797)
    assert digits.name == "digits"
    assert float(digits.images.min()) == -1.0
    assert float(digits.images.max()) == 1.0
    np.testing.assert_array_equal(digits.ids, np.arange(1797))
    assert digits.ids.dtype == np.int64
    reference = sklearn.datasets.load_digits()
    np.testing.assert_array_equal(digits.labels, reference.target)
    assert digits.labels[:10].tolist() == list(range(10))
    assert digits.source == {"kind": "digits", "size": None}


def test_digits_pixels_are_scaled_exactly(digits: ImageDataset) -> None:
    raw = sklearn.datasets.load_digits().images  # values 0..16
    np.testing.assert_array_equal(digits.images[:, 0].numpy(), raw / 8.0 - 1.0)
    assert digits.images.unique().tolist() == [v / 8 - 1 for v in range(17)]


def test_digits_resize_keeps_range_and_content(digits: ImageDataset) -> None:
    resized = load_digits(size=16)
    assert resized.images.shape == (1797, 1, 16, 16)
    assert float(resized.images.min()) >= -1.0
    assert float(resized.images.max()) <= 1.0
    assert resized.source == {"kind": "digits", "size": 16}
    np.testing.assert_array_equal(resized.labels, digits.labels)
    # Upsampling preserves the mean brightness of each image closely.
    torch.testing.assert_close(
        resized.images.mean(dim=(1, 2, 3)), digits.images.mean(dim=(1, 2, 3)), atol=0.05, rtol=0
    )


def test_digits_is_deterministic(digits: ImageDataset) -> None:
    assert load_digits().fingerprint() == digits.fingerprint()
    assert load_digits(16).fingerprint() == load_digits(16).fingerprint()
    assert load_digits(16).fingerprint() != digits.fingerprint()


@pytest.mark.parametrize("size", [0, -3, 2.5, "16", True, (16, 16)])
def test_digits_rejects_bad_size(size: object) -> None:
    with pytest.raises(DataError, match="positive int"):
        load_digits(size)  # type: ignore[arg-type]


def test_slant_style_shears_each_row_and_reloads_from_its_source(digits: ImageDataset) -> None:
    from diffattr.data import load_from_source
    from diffattr.data._loaders import SLANT_SHEAR

    slanted = load_digits(style="slant", prompts="a slanted handwritten {label}")
    assert slanted.name == "digits-slant"
    assert slanted.source["style"] == "slant"
    np.testing.assert_array_equal(slanted.labels, digits.labels)
    ink = (digits.images[:, 0].double().numpy() + 1) * 8
    out = (slanted.images[:, 0].double().numpy() + 1) * 8
    # Reference: each row resampled at x - shift by linear interpolation, blank outside.
    for row in range(8):
        shift = SLANT_SHEAR * (3.5 - row)
        padded = np.pad(ink[:, row], ((0, 0), (8, 8)))
        at = np.arange(8) - shift + 8
        expected = [np.interp(at, np.arange(24), padded[i]) for i in range(3)]
        np.testing.assert_allclose(out[:3, row], np.array(expected), atol=1e-5)
    # The top leans right and the bottom left: the ink's centre moves with the row.
    assert out[:, 0].argmax(1).mean() > ink[:, 0].argmax(1).mean()
    assert out[:, 7].argmax(1).mean() < ink[:, 7].argmax(1).mean()
    again = load_from_source(slanted.select(slanted.ids[:5]).source)
    torch.testing.assert_close(again.images, slanted.images[:5], rtol=0, atol=0)
    assert again.prompts == slanted.prompts[:5]
    assert (
        slanted.fingerprint() != digits.with_prompts("a slanted handwritten {label}").fingerprint()
    )


def test_unknown_style_is_refused() -> None:
    with pytest.raises(DataError, match="unknown digits style 'bold'"):
        load_digits(style="bold")
