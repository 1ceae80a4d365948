"""The attribution run: stages saved and reused, defaults as the CLI's, every method alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffattr.cli import main
from diffattr.data import load_digits, split_dataset
from diffattr.errors import StoreCorruptError
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig
from diffattr.methods import (
    DAS,
    METHODS,
    NDA,
    TRAK,
    Attribution,
    AttributionMethod,
    GradDot,
    ModelFreeMethod,
    PixelCosine,
    Random,
    Scores,
    attribute,
    get_method,
    nda_scores,
    pixel_cosine_scores,
    random_scores,
)
from diffattr.methods import _run as run_module
from diffattr.models import Checkpoint, TrainConfig, model_spec, train

FEATURES = FeatureConfig(
    plan=PlanConfig(num_steps=2), projection=ProjectionConfig(kind="auto", dim=32)
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    digits = load_digits().select(np.arange(48))
    split = split_dataset(digits, query_fraction=0.25, seed=0)
    spec = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 32})
    config = TrainConfig(steps=4, batch_size=8, seed=0, checkpoint_every=0)
    root = tmp_path_factory.mktemp("run")
    return train(spec, split.train, config, root / "model", split=split, progress=False)


def _run(checkpoint: Checkpoint, out: Path) -> Attribution:
    return Attribution(out, checkpoint, features=FEATURES, batch_size=8, progress=False)


def test_second_score_reuses_training_features_and_the_fit(
    checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = checkpoint.heldout_data()
    first, second = queries.select(queries.ids[:5]), queries.select(queries.ids[5:])
    whole = _run(checkpoint, tmp_path / "one").score(DAS(), queries)
    run = _run(checkpoint, tmp_path / "run")
    run.score(DAS(), first)
    fitted = sorted((tmp_path / "run" / "fitted").iterdir())
    assert [p.name.split("-")[0] for p in fitted] == ["das"]

    # A new process: reopened from its directory, it neither refits nor featurises the
    # training images again; only the new queries are featurised.
    def no_refit(self: object, train: object) -> object:
        raise AssertionError("refitted")

    monkeypatch.setattr(DAS, "_fit_one", no_refit)
    featurised = []
    real = run_module.featurize

    def counting(model, scheduler, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        featurised.append(len(dataset))
        return real(model, scheduler, dataset, *args, **kwargs)

    monkeypatch.setattr(run_module, "featurize", counting)
    again = _run(checkpoint, tmp_path / "run").score(DAS(), second)
    assert featurised[1:] == [len(second)]  # the training store is opened, not recomputed
    np.testing.assert_allclose(
        again.values, whole.values[5:], rtol=1e-5, atol=1e-6 * np.abs(whole.values).max()
    )
    assert again.settings["lambda"] == whole.settings["lambda"]
    saved = Scores.load(tmp_path / "run" / "scores" / "das")
    np.testing.assert_array_equal(saved.query_ids, second.ids)


def test_an_altered_fit_is_refused(checkpoint: Checkpoint, tmp_path: Path) -> None:
    queries = checkpoint.heldout_data()
    _run(checkpoint, tmp_path).score(TRAK(), queries)
    (folder,) = (tmp_path / "fitted").iterdir()
    factor = next(folder.glob("*factor.npy"))
    data = bytearray(factor.read_bytes())
    data[-1] ^= 0x01
    factor.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="altered"):
        _run(checkpoint, tmp_path).score(TRAK(), queries)


def test_default_settings_are_the_command_lines(checkpoint: Checkpoint, tmp_path: Path) -> None:
    queries = checkpoint.heldout_data()
    # Four lines from a checkpoint to scores, the README's Python example.
    run = Attribution(tmp_path / "py", checkpoint, progress=False)
    scores = run.score(DAS(), queries)
    argv = ["attribute", str(checkpoint.path), "--out", str(tmp_path / "cli"), "--quiet"]
    assert main(argv) == 0
    cli = Scores.load(tmp_path / "cli" / "scores" / "das")
    np.testing.assert_array_equal(cli.query_ids, scores.query_ids)
    np.testing.assert_allclose(cli.values, scores.values, rtol=1e-6, atol=1e-7)
    assert cli.settings["features"] == scores.settings["features"]
    assert scores.settings["features"]["backend"] == "factored"


def test_every_method_runs_through_the_run_and_records_itself(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    queries = checkpoint.heldout_data()
    run = _run(checkpoint, tmp_path)
    for method in (GradDot(), PixelCosine(), Random()):
        scores = run.score(method, queries)
        assert scores.method == method.name
    doc = json.loads((tmp_path / "run.json").read_text())
    assert sorted(doc["methods"]) == ["grad-dot", "pixel-cos", "random"]
    entry = doc["methods"]["pixel-cos"]
    assert entry["queries"] == {"source": queries.source}
    assert entry["checkpoints"] == [str(checkpoint.path.resolve())]


def test_model_free_methods_are_registered_and_score_as_their_functions(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    train_data = checkpoint.training_data()
    queries = checkpoint.heldout_data()
    kinds = {name: issubclass(cls, ModelFreeMethod) for name, cls in METHODS.items()}
    assert {name for name, free in kinds.items() if free} == {"nda", "pixel-cos", "random"}
    assert all(issubclass(cls, AttributionMethod) for n, cls in METHODS.items() if not kinds[n])
    nda = get_method("nda")()
    assert isinstance(nda, NDA)
    expected = {
        "nda": nda_scores(queries, train_data, nda.config, progress=False),
        "pixel-cos": pixel_cosine_scores(queries, train_data),
        "random": random_scores(queries, train_data, seed=0),
    }
    for name, reference in expected.items():
        got = attribute(
            get_method(name)(), [checkpoint], train_data, queries, FEATURES, tmp_path / name
        )
        np.testing.assert_array_equal(got.values, reference.values)
        assert got.method == name
