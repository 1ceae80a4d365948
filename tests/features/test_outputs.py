from __future__ import annotations

import json

import pytest
import torch

from diffattr._seed import generator
from diffattr.errors import ConfigError
from diffattr.features._outputs import OutputConfig, OutputFunction, output_directions

SHAPE = (2, 3, 3)


def sample(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    ("kind", "formula"),
    [
        ("loss", lambda p, e: ((p - e) ** 2).sum() / p.numel()),
        ("square_norm", lambda p, e: (p**2).sum() / p.numel()),
        ("mean", lambda p, e: p.sum() / p.numel()),
        ("l1", lambda p, e: p.abs().sum() / p.numel()),
        ("l2", lambda p, e: (p**2).sum().sqrt()),
        ("linf", lambda p, e: p.abs().max()),
    ],
)
def test_scalar_outputs_match_their_formulas(kind: str, formula) -> None:
    prediction, target = sample(0), sample(1)
    function = OutputFunction(OutputConfig(kind=kind), SHAPE, dtype=torch.float64)
    value = function(prediction, target)
    assert value.shape == (1,)
    assert function.num_outputs == 1
    assert function.directions is None
    torch.testing.assert_close(value[0], formula(prediction, target))


def test_output_projection_gives_r_projections_on_unit_directions() -> None:
    config = OutputConfig(kind="output_projection", num_directions=5, seed=3)
    function = OutputFunction(config, SHAPE, dtype=torch.float64)
    prediction = sample(0)
    values = function(prediction, sample(1))
    assert values.shape == (5,)
    assert function.num_outputs == config.num_outputs == 5
    directions = function.directions
    assert directions is not None
    assert directions.shape == (5, 18)
    torch.testing.assert_close(values, directions @ prediction.flatten())
    torch.testing.assert_close(
        torch.linalg.vector_norm(directions, dim=1), torch.ones(5, dtype=torch.float64)
    )


def test_directions_are_seeded_and_orthonormal_up_to_the_output_size() -> None:
    draw = torch.randn(3, 10, generator=generator(4, "output-directions"))
    directions = output_directions(3, 10, 4)
    torch.testing.assert_close(directions @ directions.T, torch.eye(3), atol=1e-6, rtol=0)
    # Gram-Schmidt keeps the first direction along the first draw.
    torch.testing.assert_close(directions[0], draw[0] / draw[0].norm())
    in_float64 = output_directions(3, 10, 4, dtype=torch.float64)
    assert in_float64.dtype == torch.float64
    torch.testing.assert_close(in_float64.float(), directions)
    assert not torch.allclose(output_directions(3, 10, 5), directions)
    # r = D: an orthonormal basis, so the compression keeps the full output Jacobian.
    square = output_directions(6, 6, 0, dtype=torch.float64)
    torch.testing.assert_close(square.T @ square, torch.eye(6, dtype=torch.float64))


def test_more_directions_than_outputs_are_normalised_draws() -> None:
    draw = torch.randn(12, 5, generator=generator(1, "output-directions"))
    expected = draw / draw.norm(dim=1, keepdim=True)
    torch.testing.assert_close(output_directions(12, 5, 1), expected)


def test_config_validation_and_num_outputs() -> None:
    assert OutputConfig().kind == "mean"
    assert OutputConfig(kind="loss", num_directions=7).num_outputs == 1
    with pytest.raises(ConfigError, match=r"OutputConfig\.kind='l3' is invalid: must be one of"):
        OutputConfig(kind="l3")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"OutputConfig\.num_directions=0 is invalid: must be >= 1"
    ):
        OutputConfig(num_directions=0)
    with pytest.raises(ConfigError, match=r"OutputConfig\.seed"):
        OutputConfig(seed=1.5)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    config = OutputConfig(kind="output_projection", num_directions=3, seed=2)
    assert OutputConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="no fields"):
        OutputConfig.from_dict({"kind": "mean", "r": 2})
