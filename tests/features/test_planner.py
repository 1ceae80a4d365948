from __future__ import annotations

import pytest

from diffattr.errors import ConfigError
from diffattr.features import OutputConfig, estimate_featurization
from diffattr.models import build_model, default_scheduler_config, model_spec


@pytest.fixture(scope="module")
def model() -> object:
    return build_model(model_spec("mlp-tiny", in_channels=1, sample_size=8))


def _estimate(model: object, **overrides: object) -> object:
    settings = {
        "image_shape": (1, 8, 8),
        "n_samples": 1000,
        "timesteps": 10,
        "proj_dim": 64,
        "batch_size": 4,
        "repeats": 1,
    }
    settings.update(overrides)
    return estimate_featurization(model, default_scheduler_config(), **settings)  # type: ignore[arg-type]


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
