from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffattr.data import ImageDataset, load_digits
from diffattr.errors import ConfigError, DataError
from diffattr.evaluation import ClassConfidence, CounterfactualConfig, counterfactual
from diffattr.evaluation import _counterfactual as module
from diffattr.methods import Scores, pixel_cosine_scores
from diffattr.models import Checkpoint, sample_checkpoint

from .helpers import tiny_base

CONFIG = CounterfactualConfig(k=3, n_random=1, sampler="ddim", sampling_steps=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return tiny_base(tmp_path_factory.mktemp("cf") / "base", n_train=30, steps=6)


@pytest.fixture(scope="module")
def queries(base: Checkpoint) -> ImageDataset:
    images = sample_checkpoint(base, [3, 8], sampler="ddim", num_inference_steps=4, progress=False)
    return ImageDataset(images=images, ids=np.array([3, 8]), name="generated")


def test_removal_moves_the_regeneration_and_nothing_removed_does_not(
    base: Checkpoint, queries: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_data = base.training_data()
    scores = {"pixel-cos": pixel_cosine_scores(queries, train_data)}
    classifier = ClassConfidence(load_digits())
    features = classifier.probabilities
    result = counterfactual(
        base, queries, scores, CONFIG, tmp_path, feature_map=features, progress=False
    )
    # Retraining with nothing removed repeats the base exactly: the noise floor is zero.
    np.testing.assert_array_equal(result.control_l2, [0.0, 0.0])
    assert sorted(result.pixel_l2) == ["pixel-cos", "random-0"]
    for label in ("pixel-cos", "random-0"):
        assert (result.pixel_l2[label] > 0).all()
        assert result.feature_distance[label].shape == (2,)
        assert result.removed[label].shape == (2, 3)
    top = scores["pixel-cos"].top_k(3, 3)[0]
    np.testing.assert_array_equal(result.removed["pixel-cos"][0], np.sort(top))
    doc = json.loads((tmp_path / "counterfactual.json").read_text())
    assert doc["summary"]["pixel-cos"]["pixel_l2"] == pytest.approx(
        result.pixel_l2["pixel-cos"].mean()
    )
    assert (tmp_path / "counterfactual.png").is_file()
    assert not any((tmp_path / "models").iterdir())

    # A rerun reads the finished pieces back instead of retraining.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained a finished unit")

    monkeypatch.setattr(module, "retrain_like", no_training)
    again = counterfactual(base, queries, scores, CONFIG, tmp_path, progress=False)
    np.testing.assert_array_equal(again.pixel_l2["random-0"], result.pixel_l2["random-0"])


def test_bad_counterfactual_input_is_refused(
    base: Checkpoint, queries: ImageDataset, tmp_path: Path
) -> None:
    train_data = base.training_data()
    scores = pixel_cosine_scores(queries, train_data)
    ddpm = CounterfactualConfig(k=2, sampler="ddpm", sampling_steps=4)
    with pytest.raises(DataError, match=r"not what .* generates from their seeds"):
        counterfactual(base, queries, {"p": scores}, ddpm, tmp_path, progress=False)
    other = Scores(scores.values, scores.query_ids, scores.train_ids + 1000, "x")
    with pytest.raises(DataError, match="not the base's training images"):
        counterfactual(base, queries, {"x": other}, CONFIG, tmp_path, progress=False)
    one = Scores(scores.values[:1], scores.query_ids[:1], scores.train_ids, "x")
    with pytest.raises(DataError, match=r"no row for queries \[8\]"):
        counterfactual(base, queries, {"x": one}, CONFIG, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="removes the whole training set"):
        counterfactual(base, queries, {}, CounterfactualConfig(k=30), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="k=0"):
        CounterfactualConfig(k=0)
    with pytest.raises(ConfigError, match="guidance_scale=-1"):
        CounterfactualConfig(guidance_scale=-1)
