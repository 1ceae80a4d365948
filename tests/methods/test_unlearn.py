"""Unlearning: first order like grad-dot, the LDS loss, candidates, safety, determinism."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffattr._seed import derive_seed
from diffattr.cli import main
from diffattr.data import load_digits, split_dataset
from diffattr.errors import ConfigError, DataError
from diffattr.evaluation import query_losses
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig
from diffattr.methods import METHODS, Attribution, GradDot, Scores, Unlearn, UnlearnConfig
from diffattr.methods._unlearn import ModelImages, estimate_unlearn, mean_losses
from diffattr.models import Checkpoint, TrainConfig, model_spec, train

K = 8  # loss timesteps
FEATURES64 = FeatureConfig(
    plan=PlanConfig(num_steps=2),
    projection=ProjectionConfig(kind="identity"),
    backend="vmap",
    dtype="float64",
)
#: Grad-dot over the unlearning's loss plan: phi . phi = g_x . g_i exactly.
GRAD_DOT = FeatureConfig(
    plan=PlanConfig(num_steps=K, noise="per_sample", seed=derive_seed(0, "unlearn-loss")),
    projection=ProjectionConfig(kind="identity"),
    backend="vmap",
    dtype="float64",
)
QUICK = {"loss_timesteps": K, "fisher_samples": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    digits = load_digits().select(np.arange(40))
    split = split_dataset(digits, query_fraction=0.25, seed=0)
    spec = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 16})
    config = TrainConfig(steps=6, batch_size=8, seed=0, checkpoint_every=0)
    root = tmp_path_factory.mktemp("unlearn")
    return train(spec, split.train, config, root / "model", split=split, progress=False)


@pytest.fixture(scope="module")
def queries(checkpoint: Checkpoint):
    heldout = checkpoint.heldout_data()
    return heldout.select(heldout.ids[:3])


def _score(checkpoint: Checkpoint, queries, out: Path, features=FEATURES64, **settings) -> Scores:
    run = Attribution(out, checkpoint, features=features, batch_size=8, progress=False)
    return run.score(Unlearn(UnlearnConfig(**{**QUICK, **settings})), queries)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]))


def test_one_small_step_ranks_like_grad_dot(checkpoint: Checkpoint, queries, tmp_path: Path):
    run = Attribution(tmp_path / "gd", checkpoint, features=GRAD_DOT, progress=False)
    grad_dot = run.score(GradDot(), queries).values.astype(np.float64)
    rhos, errors = [], []
    etas = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    for eta in etas:
        scores = _score(
            checkpoint,
            queries,
            tmp_path / f"eta-{eta}",
            steps=1,
            learning_rate=eta,
            fisher_weight=0.0,
        )
        # The loss rise is eta g_i . g_x + O(eta^2).
        rise = scores.values.astype(np.float64) / eta
        rhos.append(_spearman(rise, grad_dot))
        errors.append(float(np.abs(rise - grad_dot).max() / np.abs(grad_dot).max()))
    for eta, rho, error in zip(etas, rhos, errors, strict=True):
        print(f"\neta {eta:g}: Spearman with grad-dot {rho:.6f}, max relative error {error:.3g}")
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(rhos))
    assert rhos[-1] > 0.999
    # First order: the error shrinks about tenfold per tenfold smaller step.
    assert all(a > 5 * b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-3


def test_losses_are_the_lds_ground_truths(checkpoint: Checkpoint, queries) -> None:
    config = UnlearnConfig(**QUICK)
    model = checkpoint.load_model()
    scheduler_config = checkpoint.scheduler_config
    plan = config.loss_plan(scheduler_config["num_train_timesteps"])
    images = ModelImages(
        model,
        scheduler_config,
        queries,
        FeatureConfig(),
        model_id="m",
        device="cpu",
        progress=False,
    )
    ours = mean_losses(images, model, np.arange(len(queries)), plan)
    truth = query_losses(model, scheduler_config, queries, [plan])[0]
    np.testing.assert_allclose(ours, truth, rtol=1e-6)


def test_candidates_only_get_the_loss_pass(checkpoint: Checkpoint, queries, tmp_path: Path):
    full = _score(checkpoint, queries, tmp_path / "full", steps=2, learning_rate=1e-2)
    # The candidates: another method's scores (here grad-dot's), its top 5 per query.
    candidates = Attribution(tmp_path / "gd", checkpoint, features=GRAD_DOT, progress=False)
    grad_dot = candidates.score(GradDot(), queries)
    folder = str(candidates.layout.scores("grad-dot"))
    some = _score(
        checkpoint,
        queries,
        tmp_path / "some",
        steps=2,
        learning_rate=1e-2,
        candidates=folder,
        top_m=5,
    )
    for row in range(len(queries)):
        top = np.argsort(-grad_dot.values[row], kind="stable")[:5]
        np.testing.assert_allclose(some.values[row, top], full.values[row, top], rtol=1e-6)
        others = np.setdiff1d(np.arange(len(full.train_ids)), top)
        assert np.all(some.values[row, others] == some.values[row, top].min() - 1)
    assert some.settings["not_candidates"] == "row minimum - 1"
    with pytest.raises(DataError, match="holds no scores of queries"):
        _score(checkpoint, checkpoint.heldout_data(), tmp_path / "x", candidates=folder)


def test_weights_are_never_written_and_scores_are_deterministic(
    checkpoint: Checkpoint, queries, tmp_path: Path
) -> None:
    def digests() -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(checkpoint.path.iterdir())
            if p.is_file()
        }

    before = digests()
    model = checkpoint.load_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"steps": 3, "learning_rate": 0.05, "fisher_weight": 2.0}
    features = FeatureConfig(plan=PlanConfig(num_steps=2), backend="vmap")
    first = _score(checkpoint, queries, tmp_path / "a", features=features, **settings)
    again = _score(checkpoint, queries, tmp_path / "b", features=features, **settings)
    np.testing.assert_array_equal(first.values, again.values)
    assert np.abs(first.values).max() > 0
    # The penalty changes the result: it is applied.
    plain = _score(
        checkpoint, queries, tmp_path / "c", features=features, **settings | {"fisher_weight": 0.0}
    )
    assert not np.array_equal(plain.values, first.values)
    assert digests() == before
    for key, value in checkpoint.load_model().state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # No weights anywhere in the run directory either.
    assert not list((tmp_path / "a").rglob("*.safetensors"))
    assert first.settings["loss_plan"]["config"]["noise"] == "per_sample"


def test_a_stiff_penalty_holds_the_weights_without_diverging(
    checkpoint: Checkpoint, queries, tmp_path: Path
) -> None:
    # eta lambda F~ >> 2 everywhere: an explicit penalty step would diverge; the proximal one
    # pins the weights, so the losses barely move.
    settings = {"steps": 3, "learning_rate": 1.0}
    free = _score(checkpoint, queries, tmp_path / "free", fisher_weight=0.0, **settings)
    held = _score(checkpoint, queries, tmp_path / "held", fisher_weight=1e8, **settings)
    assert np.isfinite(held.values).all()
    assert np.abs(held.values).max() < 1e-3 * np.abs(free.values).max()


def test_config_is_validated() -> None:
    for bad in (
        {"steps": 0},
        {"learning_rate": 0.0},
        {"fisher_weight": -1.0},
        {"top_m": 0},
        {"loss_timesteps": 0},
    ):
        with pytest.raises(ConfigError):
            UnlearnConfig(**bad)


def test_command_line(
    checkpoint: Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert METHODS["unlearn"] is Unlearn
    out = tmp_path / "cli"
    args = [
        "attribute",
        str(checkpoint.path),
        "--method",
        "unlearn",
        "--n-queries",
        "2",
        "--steps",
        "1",
        "--loss-timesteps",
        "4",
        "--fisher-samples",
        "4",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    scores = Scores.load(out / "scores" / "unlearn")
    assert scores.values.shape[0] == 2
    assert scores.settings["config"]["loss_timesteps"] == 4
    # The summary names what unlearning used, not the unused feature settings.
    summary = capsys.readouterr().out
    assert "1 ascent steps of 0.01, losses over 4 timesteps for all training images" in summary
    assert "k=" not in summary


def test_plan_estimate_scales_its_probe_to_the_run(checkpoint: Checkpoint) -> None:
    model = checkpoint.load_model()
    config = UnlearnConfig(**QUICK)
    kwargs = {"image_shape": (1, 8, 8), "n_train": 500, "n_queries": 7, "repeats": 1}
    full = estimate_unlearn(model, checkpoint.scheduler_config, config, **kwargs)
    probe = full.probe
    assert full.candidates == 500
    assert full.seconds_per_query["unlearning"] == pytest.approx(
        config.steps * probe["seconds_per_ascent_gradient"]
    )
    assert full.seconds_per_query["loss pass"] == pytest.approx(
        500 * K * probe["seconds_per_loss_pair"]
    )
    assert full.seconds_once["fisher"] == pytest.approx(8 * probe["seconds_per_fisher_image"])
    assert full.total_seconds == pytest.approx(
        sum(full.seconds_once.values()) + 7 * full.per_query_seconds
    )
    assert all(v > 0 for v in probe.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full.memory_bytes["model and 2 copies"] == 3 * model_bytes
    assert full.memory_bytes["scores"] == 7 * 500 * 8
    assert full.to_dict()["peak_memory_bytes"] == sum(full.memory_bytes.values())
    restricted = UnlearnConfig(**QUICK, candidates="elsewhere", top_m=20)
    few = estimate_unlearn(model, checkpoint.scheduler_config, restricted, **kwargs)
    assert few.candidates == 20
    assert few.to_dict()["per_query_seconds"] == few.per_query_seconds
    with pytest.raises(ConfigError):
        estimate_unlearn(model, checkpoint.scheduler_config, image_shape=(1, 8, 8), n_train=0)


def test_plan_command_prints_the_time_per_query(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--method", "unlearn", "--model", "mlp-tiny", "--n-train", "30"]
    main([*argv, "--n-queries", "3", "--device", "cpu", "--json"])
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["method"] == "unlearn"
    assert estimate["candidates"] == 30
    assert estimate["total_seconds"] == pytest.approx(
        sum(estimate["seconds_once"].values()) + 3 * estimate["per_query_seconds"]
    )
