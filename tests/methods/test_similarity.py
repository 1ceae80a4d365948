from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset, load_digits
from diffattr.errors import DataError
from diffattr.methods import embedding_cosine_scores, pixel_cosine_scores, random_scores


def _split() -> tuple[ImageDataset, ImageDataset]:
    digits = load_digits()
    return digits.select(np.arange(5)), digits.select(np.arange(10, 30))


def test_pixel_cosine_matches_the_formula() -> None:
    queries, train = _split()
    scores = pixel_cosine_scores(queries, train)
    q = queries.images.reshape(5, -1).double()
    t = train.images.reshape(20, -1).double()
    expected = (q / q.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-6)
    assert scores.method == "pixel-cos"
    np.testing.assert_array_equal(scores.train_ids, train.ids)


def test_a_training_image_is_its_own_best_pixel_match() -> None:
    digits = load_digits().select(np.arange(40))
    scores = pixel_cosine_scores(digits.select([7, 21]), digits)
    assert scores.top_k(7, 1)[0].tolist() == [7]
    assert scores.top_k(21, 1)[0].tolist() == [21]


def test_embedding_cosine_uses_the_extractor() -> None:
    queries, train = _split()
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7)).double()

    def embed(images: torch.Tensor) -> torch.Tensor:
        return extractor(images.double())

    scores = embedding_cosine_scores(queries, train, embed, batch_size=3, name="linear7")
    with torch.no_grad():
        q, t = embed(queries.images), embed(train.images)
    expected = torch.nn.functional.cosine_similarity(q[:, None], t[None], dim=2)
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-6, atol=1e-7)
    assert scores.settings == {"extractor": "linear7", "dim": 7}


def test_similarity_rejects_bad_input() -> None:
    queries, train = _split()
    rgb = ImageDataset(images=torch.zeros(2, 3, 8, 8), ids=np.arange(2), name="rgb")
    with pytest.raises(DataError, match="differ in shape"):
        pixel_cosine_scores(rgb, train)
    with pytest.raises(DataError, match=r"\(B, d\) tensor for 5 images"):
        embedding_cosine_scores(queries, train, lambda images: images.reshape(-1))
    with pytest.raises(DataError, match="NaN"):
        embedding_cosine_scores(queries, train, lambda images: images.flatten(1) * np.nan)


def test_random_scores_are_seeded_and_follow_ids_not_order() -> None:
    digits = load_digits()
    queries, train = digits.select(np.arange(3)), digits.select(np.arange(10, 17))
    scores = random_scores(queries, train, seed=4)
    assert scores.method == "random"
    assert scores.values.shape == (3, 7)
    np.testing.assert_array_equal(random_scores(queries, train, seed=4).values, scores.values)
    assert not np.array_equal(random_scores(queries, train, seed=5).values, scores.values)
    order = np.array([6, 0, 3, 1, 5, 2, 4])
    shuffled = random_scores(queries, train.select(train.ids[order]), seed=4)
    np.testing.assert_array_equal(shuffled.values, scores.values[:, order])
