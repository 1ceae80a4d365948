"""Journey-TRAK: query features along the query's own generation, per-step scores, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDIMScheduler

from diffattr._seed import generator
from diffattr.cli import main
from diffattr.data import load_dataset, load_digits, split_dataset
from diffattr.errors import ConfigError, DataError, ReportError
from diffattr.features import FeatureConfig, FeatureStore, PlanConfig, ProjectionConfig
from diffattr.methods import METHODS, Attribution, JourneyTRAK, JourneyTRAKConfig, Scores
from diffattr.methods._journey import StepScores, estimate_journey, step_indices
from diffattr.models import (
    Checkpoint,
    DiffusionTask,
    TrainConfig,
    model_spec,
    predict,
    sample_checkpoint,
    save_samples,
    train,
)
from diffattr.report import write_report
from diffattr.report._journey import journey_figure

SEEDS = [3, 7, 11]
CHAIN = 12  # DDIM steps of the generated queries
#: Float64 gradients, no projection: the features are the loss gradients themselves.
EXACT = FeatureConfig(
    plan=PlanConfig(num_steps=2),
    projection=ProjectionConfig(kind="identity"),
    backend="vmap",
    dtype="float64",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    digits = load_digits().select(np.arange(40))
    split = split_dataset(digits, query_fraction=0.25, seed=0)
    spec = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 16})
    config = TrainConfig(steps=6, batch_size=8, seed=0, checkpoint_every=0)
    root = tmp_path_factory.mktemp("journey")
    return train(spec, split.train, config, root / "model", split=split, progress=False)


def _samples(checkpoint: Checkpoint, out: Path, record: bool = True) -> Path:
    images = sample_checkpoint(
        checkpoint, SEEDS, sampler="ddim", num_inference_steps=CHAIN, progress=False
    )
    metadata = {"sampler": "ddim", "steps": CHAIN, "eta": 0.0, "guidance_scale": 1.0}
    save_samples(images, SEEDS, out, metadata)
    if not record:
        (out / "samples.json").unlink()
    return out


@pytest.fixture(scope="module")
def samples(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _samples(checkpoint, tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def exact_run(checkpoint: Checkpoint, samples: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run")
    # Chains of one query each, as the plain loop below re-runs them: the same rounding.
    run = Attribution(out, checkpoint, features=EXACT, batch_size=1, progress=False)
    method = JourneyTRAK(JourneyTRAKConfig(journey_steps=4))
    scores = run.score(method, load_dataset(samples))
    (store_path,) = out.glob("features/*/*/journey-*-query-*")
    return run, method, scores, FeatureStore.open(store_path)


def _chain(model: torch.nn.Module, scheduler_config: dict, seed: int) -> list[torch.Tensor]:
    """The DDIM states x_t the model is evaluated at, then the final sample: a plain loop."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(CHAIN)
    draws = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, 8, 8), generator=draws)
    states = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            states.append(x)
            x = scheduler.step(predict(model, x, t), t, x, generator=[draws], eta=0.0).prev_sample
    return [*states, x]


def test_query_features_are_the_loss_gradients_at_the_trajectory_states(
    checkpoint: Checkpoint, exact_run
) -> None:
    _, _, _, store = exact_run
    model = checkpoint.load_model()
    model64 = copy.deepcopy(model).double()
    scheduler = DDIMScheduler.from_config(checkpoint.scheduler_config)
    scheduler.set_timesteps(CHAIN)
    chosen = step_indices(CHAIN, 4)
    np.testing.assert_array_equal(chosen, [0, 4, 7, 11])
    step_features = np.asarray(store.array("step_features"))
    abar = scheduler.alphas_cumprod.double()
    task = DiffusionTask(checkpoint.scheduler_config)
    for row, seed in enumerate(SEEDS):
        states = _chain(model, checkpoint.scheduler_config, seed)
        final = states[-1].double()
        for s, index in enumerate(chosen):
            t = int(scheduler.timesteps[index])
            x_t = states[index].double()
            eps = (x_t - abar[t].sqrt() * final) / (1 - abar[t]).sqrt()
            target = task.target(final, eps, torch.tensor([t]))
            loss = (predict(model64, x_t, torch.tensor([t])) - target).square().mean()
            grads = torch.autograd.grad(loss, list(model64.parameters()))
            expected = torch.cat([g.reshape(-1) for g in grads]).numpy()
            got = step_features[row, s, 0]
            assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)
            assert store.array("losses")[row, s] == pytest.approx(loss.item(), rel=1e-6)
            assert store.array("timesteps")[row, s] == t
    np.testing.assert_allclose(store.array("features"), step_features.mean(axis=1), rtol=1e-12)


def test_step_scores_are_kernel_scores_of_each_step_and_average_to_the_image_score(
    exact_run,
) -> None:
    run, method, scores, store = exact_run
    (train_path,) = run.path.glob("features/*/*/train-*")
    train = np.asarray(FeatureStore.open(train_path).array("features"))[:, 0]
    gram = train.T @ train
    lam = 0.01 * np.trace(gram) / len(gram)
    kernel = gram + lam * np.eye(len(gram))
    step_features = np.asarray(store.array("step_features"))[:, :, 0]
    expected = np.einsum("qsk,ik->qsi", step_features, scipy.linalg.solve(kernel, train.T).T)
    saved = StepScores.load(run.layout.scores("journey-trak"))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(saved.values, expected, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(scores.values, expected.mean(axis=1), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_array_equal(saved.query_ids, scores.query_ids)
    np.testing.assert_array_equal(saved.train_ids, scores.train_ids)
    np.testing.assert_array_equal(saved.timesteps, store.array("timesteps"))
    assert method.step_scores is not None
    assert Scores.load(run.layout.scores("journey-trak")).settings["aggregate"].startswith("mean")


def test_report_figure_shows_the_trajectory_and_top_images_per_step(
    checkpoint: Checkpoint, exact_run, tmp_path: Path
) -> None:
    run, _, _, store = exact_run
    steps = StepScores.load(run.layout.scores("journey-trak"))
    np.testing.assert_array_equal(steps.denoised, store.array("denoised"))
    png = journey_figure(tmp_path / "journey.png", steps, checkpoint.training_data(), SEEDS[1])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ReportError, match="no Journey-TRAK"):
        journey_figure(tmp_path / "x.png", steps, checkpoint.training_data(), 12345)


def test_denoised_target_noises_the_steps_x0_prediction_afresh(
    checkpoint: Checkpoint, samples: Path, tmp_path: Path
) -> None:
    config = JourneyTRAKConfig(journey_steps=2, journey_target="denoised", seed=5)
    run = Attribution(tmp_path, checkpoint, features=EXACT, batch_size=2, progress=False)
    run.score(JourneyTRAK(config), load_dataset(samples).select([SEEDS[0]]))
    (path,) = tmp_path.glob("features/*/*/journey-*-query-*")
    store = FeatureStore.open(path)
    model64 = copy.deepcopy(checkpoint.load_model()).double()
    scheduler = DDIMScheduler.from_config(checkpoint.scheduler_config)
    for s in range(2):
        t = int(store.array("timesteps")[0, s])
        x0 = torch.tensor(store.array("denoised")[0, s][None]).double()
        noise = torch.randn((1, 8, 8), generator=generator(5, "journey", s, SEEDS[0]))[None]
        x_t = scheduler.add_noise(x0, noise.double(), torch.tensor([t]))
        loss = (predict(model64, x_t, torch.tensor([t])) - noise.double()).square().mean()
        grads = torch.autograd.grad(loss, list(model64.parameters()))
        expected = torch.cat([g.reshape(-1) for g in grads]).numpy()
        got = store.array("step_features")[0, s, 0]
        assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)


def test_queries_without_seeds_or_sampler_are_refused(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    run = Attribution(tmp_path / "run", checkpoint, features=EXACT, progress=False)
    with pytest.raises(DataError, match="lacks seeds"):
        run.score(JourneyTRAK(), checkpoint.heldout_data())
    unrecorded = load_dataset(_samples(checkpoint, tmp_path / "bare", record=False))
    with pytest.raises(DataError, match=r"lacks sampler and number of steps \(samples.json\)"):
        run.score(JourneyTRAK(), unrecorded)
    # Stated by hand, the generation is re-run and checked against the images.
    wrong = JourneyTRAKConfig(journey_steps=2, sampler="ddim", sampling_steps=CHAIN + 1)
    with pytest.raises(DataError, match="away from the stored image"):
        run.score(JourneyTRAK(wrong), unrecorded)
    right = JourneyTRAKConfig(journey_steps=2, sampler="ddim", sampling_steps=CHAIN)
    assert run.score(JourneyTRAK(right), unrecorded).values.shape[0] == len(SEEDS)


def test_a_record_contradicting_the_settings_is_refused(
    checkpoint: Checkpoint, samples: Path, tmp_path: Path
) -> None:
    run = Attribution(tmp_path, checkpoint, features=EXACT, progress=False)
    with pytest.raises(DataError, match="records the generation"):
        run.score(JourneyTRAK(JourneyTRAKConfig(sampler="ddpm")), load_dataset(samples))
    with pytest.raises(ConfigError, match="exceeds"):
        run.score(JourneyTRAK(JourneyTRAKConfig(journey_steps=CHAIN + 1)), load_dataset(samples))


def test_config_is_validated() -> None:
    for bad in (
        {"journey_steps": 0},
        {"journey_target": "x"},
        {"sampler": "euler"},
        {"sampling_steps": -1},
        {"eta": -1.0},
    ):
        with pytest.raises(ConfigError):
            JourneyTRAKConfig(**bad)


def test_command_line(checkpoint: Checkpoint, samples: Path, tmp_path: Path) -> None:
    assert METHODS["journey-trak"] is JourneyTRAK
    out = tmp_path / "cli"
    args = [
        "attribute",
        str(checkpoint.path),
        "--method",
        "journey-trak",
        "--queries",
        str(samples),
        "--out",
        str(out),
        "--journey-steps",
        "3",
        "--timesteps",
        "2",
        "--proj-dim",
        "16",
        "--quiet",
    ]
    assert main(args) == 0
    steps = StepScores.load(out / "scores" / "journey-trak")
    assert steps.values.shape[:2] == (len(SEEDS), 3)
    settings = json.loads((out / "scores" / "journey-trak" / "scores.json").read_text())
    assert settings["settings"]["config"]["journey_steps"] == 3


def test_plan_estimate_adds_the_chain_to_the_step_gradients(checkpoint: Checkpoint) -> None:
    model = checkpoint.load_model()
    config = JourneyTRAKConfig(journey_steps=4)
    estimate = estimate_journey(
        model,
        checkpoint.scheduler_config,
        EXACT,
        config,
        image_shape=(1, 8, 8),
        n_train=30,
        n_queries=5,
        sampler="ddim",
        chain_steps=CHAIN,
        batch_size=4,
    )
    per_step = estimate.probe["seconds_per_chain_step_of_batch"]
    # Two batches (4 + 1) of 12 steps, shared by the 5 queries.
    assert estimate.seconds_per_query["chain"] == pytest.approx(per_step * CHAIN * 2 / 5)
    assert all(v > 0 for v in estimate.seconds_per_query.values())
    assert estimate.seconds_once["training features"] > 0
    assert estimate.total_seconds == pytest.approx(
        estimate.seconds_once["training features"] + 5 * estimate.per_query_seconds
    )
    assert estimate.memory_bytes["scores per step"] == 5 * 4 * 30 * 8
    assert estimate.memory_bytes["featurisation (larger)"] > 0
    with pytest.raises(ConfigError, match="exceeds"):
        estimate_journey(
            model,
            checkpoint.scheduler_config,
            config=JourneyTRAKConfig(journey_steps=20),
            image_shape=(1, 8, 8),
            n_train=30,
            chain_steps=CHAIN,
        )


def test_the_html_report_of_a_journey_run_shows_its_trajectories(exact_run, tmp_path: Path):
    run, _, _, _ = exact_run
    out = write_report(run.path, tmp_path / "report.html", k=3)
    figures = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert {f"journey-{s}.png" for s in SEEDS} == {f for f in figures if f.startswith("journey")}
    assert "journey-trak, query 3: trajectory and top images per step" in out.read_text()


def test_plan_command_prints_the_time_per_query(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--method", "journey-trak", "--model", "mlp-tiny", "--n-train", "30"]
    main([*argv, "--n-queries", "3", "--timesteps", "2", "--device", "cpu", "--json"])
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["method"] == "journey-trak"
    assert set(estimate["seconds_per_query"]) == {"chain", "step gradients"}
