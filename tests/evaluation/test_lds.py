from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffattr._io import output_lock
from diffattr.errors import BenchmarkError, ConfigError, DataError, OutputError
from diffattr.evaluation import (
    LDSBenchmark,
    LDSConfig,
    draw_masks,
    lds_from_arrays,
    lds_score,
    noise_ceiling,
    spearman_columns,
)
from diffattr.evaluation import _lds as lds_module
from diffattr.methods import JourneyTRAKConfig, Scores
from diffattr.methods._journey import generation_of
from diffattr.models import DEFAULT_STEPS, Checkpoint, sample_checkpoint

from .helpers import tiny_base

CONFIG = LDSConfig(num_subsets=4, model_seeds=2, n_heldout=5, n_generated=3, truth_timesteps=8)


# --- the statistic ---------------------------------------------------------------------------


def test_spearman_matches_scipy_column_by_column_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 6))
    b = a + rng.normal(size=(30, 6))
    a[:5, 0] = a[0, 0]  # ties in one column
    b[:, 1] = np.round(b[:, 1])
    ours = spearman_columns(a, b)
    expected = [spearmanr(a[:, q], b[:, q]).statistic for q in range(6)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_spearman_of_a_constant_column_is_zero_and_shapes_are_checked() -> None:
    a = np.ones((5, 2))
    a[:, 1] = np.arange(5)
    assert spearman_columns(a, np.arange(10.0).reshape(5, 2)).tolist() == [0.0, 1.0]
    with pytest.raises(ConfigError, match="equal"):
        spearman_columns(np.ones((5, 2)), np.ones((4, 2)))


def test_exactly_linear_ground_truth_gives_lds_one_and_shuffled_scores_about_zero() -> None:
    rng = np.random.default_rng(1)
    n_subsets, n_train, n_queries = 200, 60, 40
    masks = draw_masks(n_train, LDSConfig(num_subsets=n_subsets, seed=3))
    true_scores = rng.normal(size=(n_queries, n_train))
    # Positive scores help: a subset holding helpful images has a lower loss.
    losses = 5.0 - masks @ true_scores.T
    lds, (low, high), per_query = lds_from_arrays(masks, losses, true_scores, n_bootstrap=200)
    assert lds == pytest.approx(1.0, abs=1e-12)
    assert low == pytest.approx(1.0)
    assert high == pytest.approx(1.0)
    assert per_query.shape == (n_queries,)
    shuffled = true_scores[:, rng.permutation(n_train)]
    lds_shuffled, (low, high), _ = lds_from_arrays(masks, losses, shuffled, n_bootstrap=200)
    assert abs(lds_shuffled) < 0.1
    assert low < lds_shuffled < high
    # The sign convention matters: scores of the wrong sign give -1.
    assert lds_from_arrays(masks, losses, -true_scores, n_bootstrap=0)[0] == pytest.approx(-1.0)


def test_bootstrap_interval_brackets_a_noisy_lds_and_is_seeded() -> None:
    rng = np.random.default_rng(2)
    masks = draw_masks(50, LDSConfig(num_subsets=64))
    scores = rng.normal(size=(10, 50))
    losses = -(masks @ scores.T) + rng.normal(scale=3.0, size=(64, 10))
    first = lds_from_arrays(masks, losses, scores, n_bootstrap=300, seed=5)
    again = lds_from_arrays(masks, losses, scores, n_bootstrap=300, seed=5)
    assert first[1] == again[1]
    lds, (low, high), _ = first
    assert 0.2 < lds < 0.95
    assert low < lds < high


def test_noise_ceiling_rises_with_signal_and_needs_something_to_split() -> None:
    rng = np.random.default_rng(3)
    signal = rng.normal(size=(64, 1, 1, 20))

    def truth(noise: float) -> np.ndarray:
        return signal + rng.normal(scale=noise, size=(64, 2, 3, 20))

    quiet_r, quiet, basis = noise_ceiling(truth(0.1))
    loud_r, loud, _ = noise_ceiling(truth(2.0))
    assert basis == "model seeds"
    assert quiet_r is not None
    assert loud_r is not None
    assert quiet is not None
    assert loud is not None
    assert 0.9 < quiet_r < quiet <= 1.0
    assert loud < quiet
    assert noise_ceiling(truth(1.0)[:, :1])[2] == "noise draws"
    assert noise_ceiling(truth(1.0)[:, :1, :1]) == (None, None, None)


def test_masks_keep_exactly_alpha_n_and_rows_do_not_depend_on_m() -> None:
    masks = draw_masks(101, LDSConfig(num_subsets=8, fraction=0.5, seed=4))
    assert masks.dtype == bool
    assert masks.shape == (8, 101)
    assert (masks.sum(axis=1) == 50).all()
    more = draw_masks(101, LDSConfig(num_subsets=12, fraction=0.5, seed=4))
    np.testing.assert_array_equal(more[:8], masks)
    assert not np.array_equal(draw_masks(101, LDSConfig(num_subsets=8, seed=5)), masks)
    with pytest.raises(ConfigError, match="keeps 0 of 3"):
        draw_masks(3, LDSConfig(fraction=0.1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_subsets", 2),
        ("fraction", 1.0),
        ("model_seeds", 0),
        ("schedule", "hours"),
        ("guidance_scale", -1.0),
        ("guidance_scale", float("nan")),
    ],
)
def test_config_rejects_invalid_settings(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"LDSConfig.{field}="):
        LDSConfig(**{field: value})  # type: ignore[arg-type]


# --- building a benchmark --------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    root = tmp_path_factory.mktemp("lds-base")
    return tiny_base(root / "base", n_train=24, steps=8, checkpoint_every=2)


@pytest.fixture(scope="module")
def built(base: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> LDSBenchmark:
    benchmark = LDSBenchmark.create(
        tmp_path_factory.mktemp("lds") / "bench", base, CONFIG, progress=False
    )
    report = benchmark.build(progress=False)
    assert len(report.trained) == 8
    assert report.remaining == 0
    benchmark.merge()
    return benchmark


def test_benchmark_records_masks_queries_and_a_standalone_base(built: LDSBenchmark) -> None:
    reopened = LDSBenchmark.open(built.path)
    assert reopened.id == built.id
    assert reopened.config == CONFIG
    assert reopened.masks.shape == (4, 24)
    assert (reopened.masks.sum(1) == 12).all()
    assert sorted(reopened.queries) == ["generated", "heldout"]
    assert reopened.queries["generated"].ids.tolist() == [0, 1, 2]
    assert len(reopened.queries["heldout"]) == 5
    assert "optimizer" not in reopened.base.files
    truth = reopened.ground_truth("heldout")
    assert truth.shape == (4, 2, 2, 5)
    assert np.isfinite(truth).all()
    assert not (built.path / "models").exists() or not any((built.path / "models").iterdir())
    # Subset models repeat the base recipe for half the steps (same epochs), seeded per model.
    recipe = reopened.subset_recipe(reopened.units[1])
    assert recipe.steps == 4
    assert recipe.seed != reopened.subset_recipe(reopened.units[0]).seed
    assert recipe.seed == reopened.subset_recipe(reopened.units[3]).seed


def test_sharded_build_equals_unsharded(
    built: LDSBenchmark, base: Checkpoint, tmp_path: Path
) -> None:
    sharded = LDSBenchmark.create(tmp_path / "bench", base, CONFIG, progress=False)
    assert sharded.id == built.id
    first = sharded.build(shard=(0, 3), progress=False)
    second = sharded.build(shard=(1, 3), progress=False)
    with pytest.raises(BenchmarkError, match="2 of 8 subset models are not measured"):
        sharded.merge()
    third = sharded.build(shard=(2, 3), progress=False)
    assert [len(r.trained) for r in (first, second, third)] == [3, 3, 2]
    sharded.merge()
    for name in ("heldout", "generated"):
        np.testing.assert_array_equal(sharded.ground_truth(name), built.ground_truth(name))


def test_interrupted_build_resumes_to_the_same_truth(
    built: LDSBenchmark, base: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = LDSBenchmark.create(tmp_path / "bench", base, CONFIG, progress=False)
    assert len(bench.build(max_models=3, progress=False).trained) == 3
    # Interrupt the next unit after its model is trained but before it is measured.
    real = lds_module.query_losses

    def interrupted(*args: object, **kwargs: object) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(lds_module, "query_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.build(progress=False)
    assert (bench.path / "models" / bench.units[3].name / "checkpoint.json").exists()
    assert bench.status() == (3, 8)
    monkeypatch.setattr(lds_module, "query_losses", real)
    report = bench.build(progress=False)
    assert report.already_done == 3
    assert len(report.trained) == 5
    bench.merge()
    np.testing.assert_array_equal(bench.ground_truth("heldout"), built.ground_truth("heldout"))


def test_damaged_pieces_and_other_settings_are_refused(
    built: LDSBenchmark, base: Checkpoint, tmp_path: Path
) -> None:
    copy = tmp_path / "bench"
    shutil.copytree(built.path, copy)
    with pytest.raises(BenchmarkError, match="other settings"):
        LDSBenchmark.create(copy, base, LDSConfig(num_subsets=5, n_heldout=5, n_generated=3))
    bench = LDSBenchmark.open(copy)
    bench.piece_path(bench.units[0]).write_bytes(b"not an npz")
    with pytest.raises(BenchmarkError, match="unreadable measurement"):
        bench.merge()
    (copy / "masks.npy").write_bytes((copy / "masks.npy").read_bytes()[:-1] + b"\x01")
    with pytest.raises(BenchmarkError, match="SHA-256"):
        LDSBenchmark.open(copy)
    with pytest.raises(BenchmarkError, match="not an LDS benchmark"):
        LDSBenchmark.open(tmp_path)


def test_lds_score_matches_ids_in_any_order_and_refuses_others(built: LDSBenchmark) -> None:
    queries = built.queries["heldout"]
    rng = np.random.default_rng(0)
    values = rng.normal(size=(len(queries), len(built.train_ids)))
    scores = Scores(values, queries.ids, built.train_ids, "random")
    result = lds_score(built, scores, "heldout", n_bootstrap=50)
    assert result.n_subsets == 4
    assert result.per_query.shape == (5,)
    assert result.ceiling_basis == "model seeds"
    rows, cols = rng.permutation(len(queries)), rng.permutation(len(built.train_ids))
    permuted = Scores(values[rows][:, cols], queries.ids[rows], built.train_ids[cols], "random")
    assert lds_score(built, permuted, "heldout", n_bootstrap=50).lds == pytest.approx(result.lds)
    other = Scores(values, queries.ids, built.train_ids + 10_000, "random")
    with pytest.raises(DataError, match="training ids do not match"):
        lds_score(built, other, "heldout")
    with pytest.raises(DataError, match="heldout query ids do not match"):
        lds_score(built, Scores(values, queries.ids + 999, built.train_ids, "x"), "heldout")
    with pytest.raises(ConfigError, match="query set 'train'"):
        lds_score(built, scores, "train")


def test_ground_truth_measures_the_diffusion_loss(built: LDSBenchmark) -> None:
    model = built.base.load_model()
    plans = built.truth_plans("heldout")
    queries = built.queries["heldout"]
    losses = lds_module.query_losses(model, built.base.scheduler_config, queries, plans)
    # Reference: one (query, timestep) pair at a time.
    plan = plans[1]
    scheduler = built.base.load_scheduler()
    expected = []
    for q in range(len(queries)):
        values = []
        for k, t in enumerate(plan.timesteps):
            x0 = queries.images[q : q + 1]
            noise = plan.noise_for(k, queries.ids[q : q + 1], x0.shape[1:])
            x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
            with torch.no_grad():
                values.append(((model(x_t, torch.tensor([t])) - noise) ** 2).mean().item())
        expected.append(np.mean(values))
    np.testing.assert_allclose(losses[1], expected, rtol=1e-5)


def test_calibration_queries_are_drawn_recorded_and_scored_apart(
    base: Checkpoint, tmp_path: Path
) -> None:
    config = replace(CONFIG, n_calibration=2)
    bench = LDSBenchmark.create(tmp_path / "bench", base, config, progress=False)
    for name, queries in bench.queries.items():
        calibration = bench.calibration_ids(name)
        assert len(calibration) == 2
        assert set(calibration) <= set(queries.ids.tolist())
    assert (
        LDSBenchmark.create(tmp_path / "again", base, config, progress=False).record["queries"]
        == bench.record["queries"]
    )
    bench.build(progress=False)
    bench.merge()
    queries = bench.queries["heldout"]
    values = np.random.default_rng(1).normal(size=(len(queries), len(bench.train_ids)))
    scores = Scores(values, queries.ids, bench.train_ids, "random")
    everything = lds_score(bench, scores, "heldout", part="all", n_bootstrap=0)
    reported = lds_score(bench, scores, "heldout", n_bootstrap=0)
    calibration = lds_score(bench, scores, "heldout", part="calibration", n_bootstrap=0)
    kept = np.isin(queries.ids, bench.calibration_ids("heldout"))
    np.testing.assert_allclose(reported.per_query, everything.per_query[~kept])
    np.testing.assert_allclose(calibration.per_query, everything.per_query[kept])
    with pytest.raises(ConfigError, match="part='train'"):
        lds_score(bench, scores, "heldout", part="train")  # type: ignore[arg-type]


def test_calibration_split_must_leave_queries_to_report(built: LDSBenchmark) -> None:
    with pytest.raises(ConfigError, match=r"LDSConfig\.n_calibration="):
        LDSConfig(n_heldout=5, n_generated=0, n_calibration=5)
    queries = built.queries["heldout"]
    scores = Scores(
        np.zeros((len(queries), len(built.train_ids))), queries.ids, built.train_ids, "x"
    )
    with pytest.raises(ConfigError, match="keeps no calibration queries"):
        lds_score(built, scores, "heldout", part="calibration")
    assert len(built.calibration_ids("heldout")) == 0


def test_a_unit_built_by_another_process_is_refused_and_other_units_go_on(
    base: Checkpoint, tmp_path: Path
) -> None:
    bench = LDSBenchmark.create(tmp_path / "bench", base, CONFIG, progress=False)
    # Shards of one n run side by side; a unit is locked only while it is built.
    with output_lock(bench.path / "models" / bench.units[0].name):
        with pytest.raises(OutputError, match=f"pid {os.getpid()} on "):
            bench.build(progress=False)
        assert len(bench.build(shard=(1, 2), max_models=1, progress=False).trained) == 1
    assert bench.build(shard=(0, 2), max_models=1, progress=False).trained == [bench.units[0].name]
    assert bench.status() == (2, 8)


def test_generated_queries_record_their_generation(built: LDSBenchmark) -> None:
    # Journey-TRAK re-runs each generated query's chain from samples.json beside the queries.
    queries = LDSBenchmark.open(built.path).queries["generated"]
    generation = generation_of(queries, JourneyTRAKConfig())
    assert generation.source.endswith("queries/samples.json")
    assert (generation.sampler, generation.steps) == ("ddpm", DEFAULT_STEPS["ddpm"])
    assert generation.guidance_scale == CONFIG.guidance_scale
    again = sample_checkpoint(
        built.base,
        generation.seeds.tolist(),
        sampler=generation.sampler,
        num_inference_steps=generation.steps,
        guidance_scale=generation.guidance_scale,
        progress=False,
    )
    np.testing.assert_allclose(again.numpy(), queries.images.numpy(), atol=1e-4)
