from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import DatasetSplit, ImageDataset, load_digits, split_dataset
from diffattr.errors import DataError
from diffattr.evaluation import ClassConfidence


@pytest.fixture(scope="module")
def split() -> DatasetSplit:
    return split_dataset(load_digits(), seed=0)


@pytest.fixture(scope="module")
def confidence(split: DatasetSplit) -> ClassConfidence:
    # 600 reference digits keep the fit to a few seconds; the 180 query digits stay unseen.
    return ClassConfidence(split.train.select(split.train.ids[:600]))


def _noise(n: int, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_class_confidence_is_high_on_held_out_digits(
    confidence: ClassConfidence, split: DatasetSplit
) -> None:
    score = confidence(split.query.images)
    assert isinstance(score, float)
    assert score > 0.8


def test_class_confidence_is_low_on_noise(confidence: ClassConfidence) -> None:
    assert confidence(_noise(100)) < 0.45
    assert confidence(torch.zeros(4, 1, 8, 8)) < 0.45  # a blank image is no digit either


def test_per_image_scores_are_probabilities(
    confidence: ClassConfidence, split: DatasetSplit
) -> None:
    images = split.query.images[:7]
    scores = confidence.per_image(images)
    assert scores.shape == (7,)
    assert np.all((scores >= 0.1) & (scores <= 1))  # top of 10 classes: at least 1/10
    assert confidence(images) == pytest.approx(float(scores.mean()))
    # Each image is scored on its own.
    np.testing.assert_allclose(confidence.per_image(images[2:3]), scores[2:3], rtol=1e-12)


def test_class_confidence_rejects_other_shapes(confidence: ClassConfidence) -> None:
    with pytest.raises(DataError, match=r"\(1, 16, 16\) do not match the reference \(1, 8, 8\)"):
        confidence(_noise(3, (1, 16, 16)))
    with pytest.raises(DataError, match=r"\(3, 8, 8\)"):
        confidence.per_image(_noise(3, (3, 8, 8)))


def test_class_confidence_needs_labels() -> None:
    unlabelled = ImageDataset(images=_noise(10), ids=np.arange(10), name="unlabelled")
    with pytest.raises(DataError, match="'unlabelled' needs labels"):
        ClassConfidence(unlabelled)


def test_class_confidence_needs_two_classes() -> None:
    one_class = ImageDataset(
        images=_noise(10), ids=np.arange(10), name="ones", labels=np.ones(10, dtype=np.int64)
    )
    with pytest.raises(DataError, match=">= 2 classes"):
        ClassConfidence(one_class)
