"""The curvature stage's plan: its sizes are those of the arrays the stage saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.features import FeatureConfig, PlanConfig
from diffattr.features._curvature import CurvatureConfig, estimate_curvature, full_projection
from diffattr.features._curvature_plan import curvature_layer_bytes, estimate_curvature_cost
from diffattr.models import default_scheduler_config

SIDE = 4


class TinyConv(nn.Module):
    """Two convolutions, a GroupNorm (the rest) and a timestep Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.time = nn.Linear(2, 4, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(x_t.shape[0]) / 1000
        embedding = self.time(torch.stack([torch.sin(3 * time), torch.cos(3 * time)], dim=1))
        hidden = self.norm(self.conv1(x_t) + embedding[:, :, None, None])
        return self.conv2(nn.functional.silu(hidden))


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyConv()


def _features(model: nn.Module) -> FeatureConfig:
    return FeatureConfig(
        plan=PlanConfig(num_steps=2, seed=1),
        projection=full_projection(model, None),
        backend="factored",
    )


def test_planned_sizes_are_the_saved_curvature(tmp_path: Path) -> None:
    model = _model()
    features = _features(model)
    draw = torch.Generator().manual_seed(0)
    images = torch.rand((12, 1, SIDE, SIDE), generator=draw) * 2 - 1
    data = ImageDataset(images=images, ids=np.arange(12), name="tiny")
    config = CurvatureConfig()
    curvature = estimate_curvature(
        model,
        default_scheduler_config(),
        data,
        features,
        config,
        tmp_path / "curvature",
        model_id="m",
        batch_size=4,
        progress=False,
    )
    plan = estimate_curvature_cost(
        model,
        default_scheduler_config(),
        features,
        config,
        image_shape=(1, SIDE, SIDE),
        n_images=len(data),
        batch_size=4,
        repeats=1,
    )
    saved = load_file(str(tmp_path / "curvature" / "curvature.safetensors"))
    assert plan.disk_bytes == sum(array.nbytes for array in saved.values())
    file_size = (tmp_path / "curvature" / "curvature.safetensors").stat().st_size
    assert plan.disk_bytes <= file_size <= plan.disk_bytes + 4096  # the header
    assert [layer["module"] for layer in plan.layers] == list(curvature.layers)
    for index, layer in enumerate(plan.layers):
        real = {
            k.split(".", 2)[2]: v.nbytes
            for k, v in saved.items()
            if k.startswith(f"layers.{index}.")
        }
        assert real == curvature_layer_bytes(layer["d_out"], layer["d_in"])
        assert layer["bytes"] == sum(real.values())
        held = curvature.layers[layer["module"]]
        assert (held.s.shape[0], held.a.shape[0]) == (layer["d_out"], layer["d_in"])
    assert plan.rest == saved["rest"].size == 8  # the GroupNorm's scale and shift
    assert plan.parameters == curvature.num_parameters
    assert plan.directions == 1
    assert plan.timesteps == 2
    assert set(plan.seconds) == {"factors", "eigendecompositions", "eigenvalues"}
    assert all(value > 0 for value in plan.seconds.values())
    assert plan.peak_memory_bytes == max(plan.memory_bytes.values()) > plan.disk_bytes
    # Saving holds the model and its copy, the whole estimate and its serialised bytes.
    model_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.memory_bytes["save"] == model_bytes + 2 * plan.disk_bytes
    assert plan.to_dict()["total_seconds"] == pytest.approx(sum(plan.seconds.values()))


def test_exact_fisher_counts_every_output_direction() -> None:
    model = _model()
    plan = estimate_curvature_cost(
        model,
        default_scheduler_config(),
        _features(model),
        CurvatureConfig(fisher="exact"),
        image_shape=(1, SIDE, SIDE),
        n_images=3,
        probe=False,
    )
    assert plan.directions == SIDE * SIDE
    assert plan.seconds == {}
    assert plan.batch_size == 3


def test_no_images_is_config_error() -> None:
    with pytest.raises(ConfigError, match="n_images"):
        estimate_curvature_cost(
            _model(), default_scheduler_config(), image_shape=(1, SIDE, SIDE), n_images=0
        )
