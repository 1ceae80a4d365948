from __future__ import annotations

import pytest

from diffattr.errors import ConfigError
from diffattr.features import (
    FeatureConfig,
    OutputConfig,
    PlanConfig,
    ProjectionConfig,
    estimate_featurization,
)
from diffattr.models import build_model, default_scheduler_config, model_spec


@pytest.fixture(scope="module")
def model() -> object:
    return build_model(model_spec("mlp-tiny", in_channels=1, sample_size=8))


def _estimate(
    model: object,
    *,
    max_memory_mb: int = 4096,
    output: OutputConfig | None = None,
    backend: str = "vmap",
    **overrides: object,
) -> object:
    features = FeatureConfig(
        output=output or OutputConfig(),
        plan=PlanConfig(num_steps=10),
        projection=ProjectionConfig(dim=64, max_memory_mb=max_memory_mb),
        backend=backend,  # type: ignore[arg-type]
    )
    settings = {"image_shape": (1, 8, 8), "n_samples": 1000, "batch_size": 4, "repeats": 1}
    settings.update(overrides)
    return estimate_featurization(model, default_scheduler_config(), features, **settings)  # type: ignore[arg-type]


def test_estimate_follows_the_shapes_and_the_probe(model: object) -> None:
    estimate = _estimate(model)
    p = estimate.parameters
    assert p == 528_704
    assert estimate.matrix_kept
    assert estimate.memory_bytes["projection_matrix"] == p * 64 * 4
    # Per image: 64 features, 10 losses, 10 norms, 10 residuals, float32.
    assert estimate.disk_bytes == 1000 * (64 + 30) * 4
    assert estimate.probe["seconds_per_gradient_pair"] > 0
    assert estimate.seconds["gradients"] == pytest.approx(
        estimate.probe["seconds_per_gradient_pair"] * 1000 * 10
    )
    assert estimate.total_seconds == pytest.approx(sum(estimate.seconds.values()))
    assert estimate.to_dict()["peak_memory_bytes"] == estimate.peak_memory_bytes


def test_a_matrix_over_the_memory_limit_is_regenerated_per_buffer(model: object) -> None:
    small = _estimate(model, max_memory_mb=1, projection_buffer_mb=64)
    assert not small.matrix_kept
    # Only one 64 MB block of the matrix is resident at a time.
    assert small.memory_bytes["projection_matrix"] == 64 << 20
    # 64 MB of 2.1 MB gradients: 31 rows per buffer, so 1000 images need the matrix 33 times.
    per_element = small.probe["seconds_per_matrix_element"]
    expected = per_element * small.parameters * 64 * 33
    assert small.seconds["projection_generation"] == pytest.approx(expected)


def test_output_projection_multiplies_the_features(model: object) -> None:
    output = OutputConfig(kind="output_projection", num_directions=3)
    estimate = _estimate(model, output=output, n_samples=10)
    assert estimate.outputs == 3
    assert estimate.disk_bytes == 10 * (3 * 64 + 20 + 30) * 4


def test_bad_sizes_are_refused(model: object) -> None:
    with pytest.raises(ConfigError, match="n_samples=0"):
        _estimate(model, n_samples=0)


def test_the_default_settings_plan_the_backend_a_run_would_use(model: object) -> None:
    # FeatureConfig() resolves "auto" by the backend rule, for the plan as for featurize.
    estimate = estimate_featurization(
        model, default_scheduler_config(), image_shape=(1, 8, 8), n_samples=10, repeats=1
    )
    assert estimate.backend == FeatureConfig().resolve(model).backend  # type: ignore[arg-type]
    assert (estimate.timesteps, estimate.proj_dim) == (10, 1024)


def test_float16_storage_halves_the_stored_features(model: object) -> None:
    compute = _estimate(model, n_samples=10)
    features = FeatureConfig(
        plan=PlanConfig(num_steps=10),
        projection=ProjectionConfig(dim=64),
        backend="vmap",
        storage="float16",
    )
    half = estimate_featurization(
        model, default_scheduler_config(), features, image_shape=(1, 8, 8), n_samples=10, repeats=1
    )
    assert compute.disk_bytes - half.disk_bytes == 10 * 64 * 2  # type: ignore[attr-defined]
