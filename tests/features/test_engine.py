"""featurize: the stored features against a manual computation, invariances, resumption, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError, StoreMismatchError
from diffattr.features import (
    FeatureConfig,
    FeatureStore,
    GradientComputer,
    OutputConfig,
    Plan,
    PlanConfig,
    ProjectionConfig,
    featurize,
    make_projector,
)
from diffattr.features import _engine as engine
from diffattr.models import default_scheduler_config
from tests.methods.helpers import make_model

N_IMAGES = 10
PLAN = PlanConfig(strategy="uniform", num_steps=2, seed=5)
PROJECTION = ProjectionConfig(kind="dense", dim=16, seed=3)
CONFIG = FeatureConfig(plan=PLAN, projection=PROJECTION, dtype="float64")
ARRAYS = ("features", "losses", "grad_norms", "residuals")


def make_dataset(n: int = N_IMAGES, seed: int = 0, size: int = 8) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, size, size), generator=draw) * 2 - 1
    # Ids that are not positions, so that a row/id mix-up shows.
    return ImageDataset(images=images, ids=np.arange(n, dtype=np.int64) * 7 + 3, name="noise")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    return make_dataset()


def run(
    model: nn.Module,
    dataset: ImageDataset,
    config: FeatureConfig,
    path: Path,
    **kwargs: object,
) -> FeatureStore:
    options: dict[str, object] = {
        "model_id": "tiny",
        "batch_size": 3,
        "chunk_size": 4,
        "progress": False,
    }
    options.update(kwargs)
    return featurize(model, default_scheduler_config(), dataset, config, path, **options)


def arrays(store: FeatureStore) -> dict[str, np.ndarray]:
    return {name: np.array(store.array(name)) for name in ARRAYS}


def assert_same_rows(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13 * max(np.abs(b).max(), 1e-300))


def manual_features(
    model: nn.Module, dataset: ImageDataset, config: FeatureConfig
) -> dict[str, np.ndarray]:
    """The features computed sample by sample from the public building blocks."""
    computer = GradientComputer(
        model,
        default_scheduler_config(),
        config.output,
        config.parameters,
        dtype=torch.float64,
    )
    plan = Plan.build(config.plan, computer.num_train_timesteps)
    projector = make_projector(config.projection, computer.num_parameters)
    features, losses, norms, residuals = [], [], [], []
    for row, sample_id in enumerate(dataset.ids):
        x0 = dataset.images[row : row + 1]
        total = torch.zeros((computer.num_outputs, computer.num_parameters), dtype=torch.float64)
        sample_losses, sample_norms, sample_residuals = [], [], []
        for step, timestep in enumerate(plan.timesteps):
            noise = plan.noise_for(step, [int(sample_id)], tuple(x0.shape[1:]))
            grads, loss, residual = computer.compute(x0, int(timestep), noise)
            grad = grads[0]
            norm = torch.linalg.vector_norm(grad)
            total += grad / norm if config.normalize else grad
            sample_losses.append(float(loss[0]))
            sample_norms.append(float(norm))
            sample_residuals.append(residual[0].numpy())
        mean = total / len(plan)
        features.append(projector.project(mean).numpy())
        losses.append(sample_losses)
        norms.append(sample_norms)
        residuals.append(sample_residuals)
    return {
        "features": np.stack(features),
        "losses": np.array(losses),
        "grad_norms": np.array(norms),
        "residuals": np.array(residuals),
    }


# ---------------------------------------------------------------------- results


def test_store_is_complete_with_documented_shapes(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    config = replace(CONFIG, output=OutputConfig(kind="output_projection", num_directions=2))
    store = run(model, dataset, config, tmp_path / "s")
    assert store.complete
    n, k, steps, r = N_IMAGES, PROJECTION.dim, PLAN.num_steps, 2
    np.testing.assert_array_equal(store.ids, dataset.ids)
    assert store.array("features").shape == (n, r, k)
    assert store.array("losses").shape == (n, steps)
    assert store.array("grad_norms").shape == (n, steps)
    assert store.array("residuals").shape == (n, steps, r)
    for name in ARRAYS:
        assert store.array(name).dtype == np.float64
        assert np.isfinite(store.array(name)).all()
    # Reopening with full verification succeeds: the store is sealed with its hashes.
    FeatureStore.open(tmp_path / "s")
    assert store.settings["model_id"] == "tiny"
    assert store.settings["features"]["output"]["num_directions"] == 2


def test_float32_config_gives_float32_arrays(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    store = run(model, dataset, replace(CONFIG, dtype="float32"), tmp_path / "s")
    for name in ARRAYS:
        assert store.array(name).dtype == np.float32


@pytest.mark.parametrize(
    ("output", "normalize"),
    [
        (OutputConfig(kind="mean"), True),
        (OutputConfig(kind="mean"), False),
        (OutputConfig(kind="loss"), False),
        (OutputConfig(kind="output_projection", num_directions=2, seed=4), True),
    ],
    ids=["mean-normalized", "mean-raw", "loss-raw", "projection2-normalized"],
)
def test_features_equal_manual_computation(
    model: nn.Module,
    dataset: ImageDataset,
    tmp_path: Path,
    output: OutputConfig,
    normalize: bool,
) -> None:
    config = replace(CONFIG, output=output, normalize=normalize)
    store = run(model, dataset, config, tmp_path / "s")
    expected = manual_features(model, dataset, config)
    got = arrays(store)
    assert_same_rows(got["features"], expected["features"])
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-12)
    np.testing.assert_allclose(got["grad_norms"], expected["grad_norms"], rtol=1e-12)
    assert_same_rows(got["residuals"], expected["residuals"])


def test_normalize_changes_the_features(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    normalized = run(model, dataset, CONFIG, tmp_path / "a")
    raw = run(model, dataset, replace(CONFIG, normalize=False), tmp_path / "b")
    assert not np.allclose(normalized.array("features"), raw.array("features"))
    # The auxiliary arrays do not depend on the normalisation.
    np.testing.assert_array_equal(normalized.array("losses"), raw.array("losses"))
    np.testing.assert_array_equal(normalized.array("grad_norms"), raw.array("grad_norms"))


def test_parameter_subset_has_its_own_parameter_count(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    config = replace(CONFIG, parameters=("output.*",))
    store = run(model, dataset, config, tmp_path / "s")
    assert store.settings["parameter_count"] == 64 * 16 + 64
    assert_same_rows(arrays(store)["features"], manual_features(model, dataset, config)["features"])


# ---------------------------------------------------------------------- invariances


@pytest.fixture(scope="module")
def reference(
    model: nn.Module, dataset: ImageDataset, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("engine-reference") / "s"
    return arrays(run(model, dataset, CONFIG, path, batch_size=3, chunk_size=4))


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 1, "chunk_size": 10},
        {"batch_size": 4, "chunk_size": 7},
        {"batch_size": 10, "chunk_size": 3},
        {"batch_size": 3, "chunk_size": 4, "projection_buffer_mb": 0},
        {"batch_size": 2, "chunk_size": 10, "projection_buffer_mb": 0},
    ],
    ids=["b1-c10", "b4-c7", "b10-c3", "b3-c4-tiny-buffer", "b2-c10-tiny-buffer"],
)
def test_independent_of_batching_and_buffer(
    model: nn.Module,
    dataset: ImageDataset,
    reference: dict[str, np.ndarray],
    tmp_path: Path,
    options: dict[str, int],
) -> None:
    got = arrays(run(model, dataset, CONFIG, tmp_path / "s", **options))
    for name in ARRAYS:
        assert_same_rows(got[name], reference[name])


def test_independent_of_row_order(
    model: nn.Module, dataset: ImageDataset, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    permuted_ids = np.random.default_rng(0).permutation(dataset.ids)
    assert not np.array_equal(permuted_ids, dataset.ids)
    permuted = dataset.select(permuted_ids)
    store = run(model, permuted, CONFIG, tmp_path / "s")
    np.testing.assert_array_equal(store.ids, permuted_ids)
    row_of = {int(i): row for row, i in enumerate(dataset.ids)}
    rows = [row_of[int(i)] for i in permuted_ids]
    got = arrays(store)
    for name in ARRAYS:
        assert_same_rows(got[name], reference[name][rows])


# ---------------------------------------------------------------------- resumption


def test_interrupted_run_resumes_without_recomputing_finished_chunks(
    model: nn.Module,
    dataset: ImageDataset,
    reference: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "s"
    original_write = FeatureStore.write_chunk
    writes = []

    def failing_write(self: FeatureStore, chunk: int, values: dict) -> None:
        writes.append(chunk)
        if len(writes) == 2:
            raise RuntimeError("simulated crash while writing the second chunk")
        original_write(self, chunk, values)

    with monkeypatch.context() as patch:
        patch.setattr(FeatureStore, "write_chunk", failing_write)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(model, dataset, CONFIG, path, batch_size=3, chunk_size=4)
    assert writes == [0, 1]
    progress = json.loads((path / "progress.json").read_text())
    assert sorted(progress["chunks"]) == ["0"]  # only the first chunk finished

    original_compute = GradientComputer.compute
    computed_ids: list[int] = []

    def counting_compute(self: GradientComputer, x0: torch.Tensor, *args: object) -> object:
        # Identify the samples by their images (the noise is per sample).
        for image in x0:
            matches = (dataset.images == image).flatten(1).all(dim=1).nonzero().flatten()
            computed_ids.extend(int(dataset.ids[m]) for m in matches)
        return original_compute(self, x0, *args)

    monkeypatch.setattr(GradientComputer, "compute", counting_compute)
    store = run(model, dataset, CONFIG, path, batch_size=3, chunk_size=4)
    assert store.complete
    # Chunk 0 (the first 4 ids) was kept; the other 6 images ran once per plan step.
    assert sorted(set(computed_ids)) == sorted(int(i) for i in dataset.ids[4:])
    assert len(computed_ids) == (N_IMAGES - 4) * PLAN.num_steps
    got = arrays(FeatureStore.open(path))
    for name in ARRAYS:
        assert_same_rows(got[name], reference[name])


def test_rerun_of_complete_store_computes_nothing(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    first = arrays(run(model, dataset, CONFIG, path))

    def no_compute(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete store must not be recomputed")

    monkeypatch.setattr(GradientComputer, "compute", no_compute)
    # Speed-only options may change on a rerun.
    again = run(model, dataset, CONFIG, path, batch_size=5, projection_buffer_mb=0)
    for name in ARRAYS:
        np.testing.assert_array_equal(arrays(again)[name], first[name])


# ---------------------------------------------------------------------- mismatches and errors


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"config": replace(CONFIG, plan=replace(PLAN, seed=6))}, "features.plan.seed"),
        (
            {"config": replace(CONFIG, projection=replace(PROJECTION, seed=4))},
            "features.projection.seed",
        ),
        ({"config": replace(CONFIG, output=OutputConfig(kind="loss"))}, "features.output.kind"),
        ({"config": replace(CONFIG, normalize=False)}, "features.normalize"),
        ({"model_id": "other-checkpoint"}, "model_id"),
    ],
    ids=["plan-seed", "projection-seed", "output-kind", "normalize", "model-id"],
)
def test_existing_store_with_other_settings_is_refused(
    model: nn.Module,
    dataset: ImageDataset,
    tmp_path: Path,
    change: dict[str, object],
    key: str,
) -> None:
    path = tmp_path / "s"
    run(model, dataset, CONFIG, path)
    options = dict(change)
    config = options.pop("config", CONFIG)
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")):
        run(model, dataset, config, path, **options)


def test_other_samples_in_same_path_are_refused(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    path = tmp_path / "s"
    run(model, dataset, CONFIG, path)
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        run(model, make_dataset(seed=1), CONFIG, path)


def test_projection_dim_larger_than_parameters_is_config_error(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    # output.bias has 64 parameters.
    config = replace(CONFIG, parameters=("output.bias",), projection=replace(PROJECTION, dim=65))
    with pytest.raises(ConfigError, match="65"):
        run(model, dataset, config, tmp_path / "s")


def test_unknown_parameter_pattern_is_config_error(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    config = replace(CONFIG, parameters=("no_such_layer.*",))
    with pytest.raises(ConfigError, match="no_such_layer"):
        run(model, dataset, config, tmp_path / "s")


def test_images_of_wrong_size_are_data_error(model: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expects"):
        run(model, make_dataset(n=4, size=4), CONFIG, tmp_path / "s")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size_is_config_error(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path, batch_size: int
) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        run(model, dataset, CONFIG, tmp_path / "s", batch_size=batch_size)
    assert not (tmp_path / "s").exists()


def test_feature_config_round_trips_through_json() -> None:
    config = FeatureConfig(
        output=OutputConfig(kind="output_projection", num_directions=3, seed=2),
        plan=PlanConfig(strategy="explicit", timesteps=[7, 300], noise="shared", seed=9),
        projection=ProjectionConfig(kind="sparse", dim=32, seed=1, nnz=2),
        parameters=["output.*", "blocks.*"],
        normalize=False,
        dtype="float64",
    )
    assert config.parameters == ("output.*", "blocks.*")
    data = json.loads(json.dumps(config.to_dict()))
    assert FeatureConfig.from_dict(data) == config
    assert FeatureConfig.from_dict(FeatureConfig().to_dict()) == FeatureConfig()


@pytest.mark.parametrize(
    "changes",
    [{"dtype": "float16"}, {"dtype": "double"}, {"parameters": "output.*"}],
    ids=["float16", "double", "parameters-string"],
)
def test_invalid_feature_config_is_config_error(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FeatureConfig(**changes)


def test_from_dict_with_unknown_key_is_config_error() -> None:
    data = FeatureConfig().to_dict()
    data["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        FeatureConfig.from_dict(data)


# ---------------------------------------------------------------------- noise sharing


@pytest.mark.parametrize("noise", ["shared", "per_sample"])
def test_noise_sharing(model: nn.Module, tmp_path: Path, noise: str) -> None:
    image = make_dataset(n=1).images
    twins = ImageDataset(images=image.repeat(2, 1, 1, 1), ids=np.array([11, 42]), name="twins")
    config = replace(CONFIG, plan=replace(PLAN, noise=noise))
    features = np.array(run(model, twins, config, tmp_path / "s").array("features"))
    if noise == "shared":
        np.testing.assert_array_equal(features[0], features[1])
    else:
        assert not np.allclose(features[0], features[1])


def test_out_of_memory_halves_the_batch_and_gives_the_same_features(
    model: nn.Module,
    dataset: ImageDataset,
    reference: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = engine._batch_gradients
    sizes: list[int] = []

    def tight_memory(computer: object, plan: object, x0: torch.Tensor, *args: object) -> object:
        sizes.append(len(x0))
        if len(x0) > 2:
            raise torch.OutOfMemoryError("simulated: the batch does not fit")
        return real(computer, plan, x0, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_batch_gradients", tight_memory)
    with pytest.warns(ResourceWarning, match="retrying with 4"):
        got = arrays(run(model, dataset, CONFIG, tmp_path / "s", batch_size=8, chunk_size=10))
    assert sizes[:3] == [8, 4, 2]
    assert max(sizes[3:]) == 2
    for name in ARRAYS:
        assert_same_rows(got[name], reference[name])

    def no_memory(*args: object) -> object:
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(engine, "_batch_gradients", no_memory)
    refused = pytest.raises(ConfigError, match="out of memory with one image per batch")
    with refused, pytest.warns(ResourceWarning):
        run(model, dataset, CONFIG, tmp_path / "t", batch_size=2)


def test_bf16_features_are_close_to_float32_and_recorded(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    full = replace(CONFIG, dtype="float32")
    reference = arrays(run(model, dataset, full, tmp_path / "f32"))
    store = run(model, dataset, replace(full, mixed_precision="bf16"), tmp_path / "bf16")
    assert store.settings["features"]["mixed_precision"] == "bf16"
    got = arrays(store)
    assert got["features"].dtype == np.float32
    error = np.linalg.norm(got["features"] - reference["features"], axis=-1)
    relative = error / np.linalg.norm(reference["features"], axis=-1)
    assert 0 < relative.max() < 0.05
    # A bf16 store is not resumed by a float32 run: the precision is part of the settings.
    with pytest.raises(StoreMismatchError, match="mixed_precision"):
        run(model, dataset, full, tmp_path / "bf16")


def test_mixed_precision_settings_are_checked(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="needs dtype='float32'"):
        replace(CONFIG, mixed_precision="bf16", dtype="float64")
    with pytest.raises(ConfigError, match="mixed_precision='fp8' is invalid"):
        replace(CONFIG, mixed_precision="fp8")
    tf32 = replace(CONFIG, dtype="float32", mixed_precision="tf32")
    with pytest.raises(ConfigError, match="tf32' is a CUDA matmul mode"):
        run(model, dataset, tf32, tmp_path / "s", device="cpu")


# ---------------------------------------------------------------------- factored backend

KRONECKER = ProjectionConfig(kind="kronecker", dim=40, seed=3)


@pytest.mark.parametrize(
    "output",
    [OutputConfig(kind="mean"), OutputConfig(kind="output_projection", num_directions=2)],
    ids=["mean", "output_projection"],
)
def test_factored_backend_equals_vmap_with_the_same_kronecker_projection(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path, output: OutputConfig
) -> None:
    vmap_config = replace(CONFIG, projection=KRONECKER, output=output, backend="vmap")
    factored_config = replace(vmap_config, backend="factored")
    by_vmap = arrays(run(model, dataset, vmap_config, tmp_path / "vmap"))
    factored = run(model, dataset, factored_config, tmp_path / "factored")
    for name, values in arrays(factored).items():
        assert_same_rows(values, by_vmap[name])
    assert factored.settings["features"]["backend"] == "factored"
    layout = factored.settings["projector"]["layout"]
    assert layout["proj_dim"] == factored.array("features").shape[2] <= KRONECKER.dim
    assert {"module", "d_out", "d_in", "k_out", "k_in"} <= set(layout["blocks"][0])


def test_store_of_the_other_backend_is_refused(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    config = replace(CONFIG, projection=KRONECKER, backend="vmap")
    run(model, dataset, config, tmp_path / "s")
    with pytest.raises(StoreMismatchError, match=r"features\.backend"):
        run(model, dataset, replace(config, backend="factored"), tmp_path / "s")


def test_factored_backend_needs_a_kronecker_projection() -> None:
    with pytest.raises(ConfigError, match="kronecker"):
        FeatureConfig(backend="factored", projection=ProjectionConfig(kind="dense"))
    with pytest.raises(ConfigError, match="backend"):
        FeatureConfig(backend="hooks")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="KroneckerLayout"):
        make_projector(KRONECKER, 1000)
    config = FeatureConfig(projection=KRONECKER, backend="factored")
    assert FeatureConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_float16_storage_halves_the_features_and_keeps_their_values(
    model: nn.Module, dataset: ImageDataset, tmp_path: Path
) -> None:
    full = run(model, dataset, replace(CONFIG, dtype="float32"), tmp_path / "f32")
    half = run(model, dataset, replace(CONFIG, dtype="float32", storage="float16"), tmp_path / "h")
    assert half.array("features").dtype == np.float16
    assert half.array("losses").dtype == np.float32
    assert half.settings["features"]["storage"] == "float16"
    np.testing.assert_allclose(
        np.asarray(half.array("features"), np.float32),
        full.array("features"),
        rtol=1e-3,
        atol=1e-3 * np.abs(full.array("features")).max(),
    )
    with pytest.raises(ConfigError, match="storage"):
        FeatureConfig(storage="int8")  # type: ignore[arg-type]
