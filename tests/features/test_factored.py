"""The factored backend against exact per-sample gradients (vmap) on a diffusers UNet and an MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffattr.errors import ConfigError, DataError
from diffattr.features import (
    FactoredGradientComputer,
    GradientComputer,
    OutputConfig,
    ProjectionConfig,
    select_parameters,
)
from diffattr.features._factored import explicit_is_cheaper
from diffattr.features._gradients import use_batchable_attention
from diffattr.models import build_model, default_scheduler_config, model_spec

OUTPUTS = [
    OutputConfig(kind="loss"),
    OutputConfig(kind="square_norm"),
    OutputConfig(kind="mean"),
    OutputConfig(kind="output_projection", num_directions=3, seed=4),
]
#: A small projection for the tests of refusals.
SMALL = ProjectionConfig(kind="kronecker", dim=4)


def whole(model: nn.Module, patterns: tuple[str, ...] | None = None) -> ProjectionConfig:
    """k = p: every factor is the identity and nothing is projected."""
    p = sum(dict(model.named_parameters())[n].numel() for n in select_parameters(model, patterns))
    return ProjectionConfig(kind="kronecker", dim=p)


TIMESTEP = 321


def make_unet() -> nn.Module:
    """unet-tiny (UNet2DModel with mid-block attention) with every parameter random.

    Both backends get the classic attention processor: torch's CPU SDPA kernel differs from it by
    ~1e-8 relative even in float64, which would hide the backends' own agreement.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_spec("unet-tiny", in_channels=1, sample_size=8))
        for param in model.parameters():
            nn.init.normal_(param, std=0.2)
    use_batchable_attention(model)
    return model


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        spec = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 24})
        model = build_model(spec)
        for param in model.parameters():
            nn.init.normal_(param, std=0.2)
    return model


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return make_unet()


def inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    draw = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 1, 8, 8), generator=draw, dtype=torch.float64) * 2 - 1
    return x0, torch.randn(x0.shape, generator=draw, dtype=torch.float64)


def exact_layout_order(
    model: nn.Module, computer: FactoredGradientComputer, output: OutputConfig, x0, noise
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-sample gradients (vmap), rearranged into the factored identity layout."""
    exact = GradientComputer(model, default_scheduler_config(), output, dtype=torch.float64)
    grads = exact.compute(x0, TIMESTEP, noise).grads
    batch, r = grads.shape[:2]
    offsets, start = {}, 0
    for name, param in exact._model.named_parameters():
        offsets[name] = slice(start, start + param.numel())
        start += param.numel()
    parts = []
    for block in computer.layout.blocks:
        matrix = grads[:, :, offsets[block.weight]].reshape(batch, r, block.d_out, -1)
        if block.bias is not None:
            matrix = torch.cat([matrix, grads[:, :, offsets[block.bias], None]], dim=3)
        parts.append(matrix.flatten(2))
    parts += [grads[:, :, offsets[rest.name]] for rest in computer.layout.rest]
    return torch.cat(parts, dim=2), grads.flatten(1).norm(dim=1)


def assert_equals_projected_exact_gradients(
    computer: FactoredGradientComputer, x0: torch.Tensor, noise: torch.Tensor, rtol: float
) -> None:
    """Factored features = the Kronecker map of the exact (vmap) gradients; norms exact."""
    got = computer.compute_features(x0, TIMESTEP, noise)
    grads = computer.compute(x0, TIMESTEP, noise).grads
    batch, r = grads.shape[:2]
    expected = computer.projector.project(grads.reshape(batch * r, -1)).reshape(batch, r, -1)
    torch.testing.assert_close(got.features, expected, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(got.norms, grads.flatten(1).norm(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: o.kind)
def test_identity_factors_reproduce_exact_per_sample_gradients_of_a_unet(
    unet: nn.Module, output: OutputConfig
) -> None:
    computer = FactoredGradientComputer(
        unet, default_scheduler_config(), output, whole(unet), dtype=torch.float64
    )
    # Every parameter of the UNet (convs, attention projections, norms) is covered.
    assert computer.proj_dim == computer.num_parameters
    assert any(".to_q" in block.module for block in computer.layout.blocks)
    x0, noise = inputs()
    got = computer.compute_features(x0, TIMESTEP, noise)
    expected, norms = exact_layout_order(unet, computer, output, x0, noise)
    assert got.features.shape == expected.shape
    error = (got.features - expected).norm() / expected.norm()
    assert error < 1e-8
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("factored_dim", [300, 3000], ids=["one-stage", "two-stage"])
def test_random_factors_equal_the_projection_of_exact_gradients(factored_dim: int) -> None:
    model = make_mlp()
    output = OutputConfig(kind="output_projection", num_directions=2, seed=0)
    projection = ProjectionConfig(kind="kronecker", dim=300, seed=7, factored_dim=factored_dim)
    computer = FactoredGradientComputer(
        model, default_scheduler_config(), output, projection, dtype=torch.float64
    )
    assert computer.proj_dim <= 300
    assert computer.layout.factored_dim <= factored_dim
    assert computer.layout.rest_dim < computer.layout.rest_numel  # the rest is projected too
    x0, noise = inputs(batch=4, seed=2)
    assert_equals_projected_exact_gradients(computer, x0, noise, rtol=1e-10)


def test_random_factors_on_a_unet_take_both_norm_paths(unet: nn.Module) -> None:
    """Convolutions (many positions) form their gradient, P = 1 layers use the ghost norm."""
    projection = ProjectionConfig(kind="kronecker", dim=256, factored_dim=4096, seed=2)
    computer = FactoredGradientComputer(
        unet, default_scheduler_config(), OUTPUTS[0], projection, dtype=torch.float64
    )
    cheaper = {
        block.module: explicit_is_cheaper(block, 1 if block.kind == "linear" else 64)
        for block in computer.layout.blocks
    }
    assert cheaper["conv_in"]
    assert not cheaper["time_embedding.linear_2"]
    x0, noise = inputs(batch=2)
    assert_equals_projected_exact_gradients(computer, x0, noise, rtol=1e-9)


def test_a_sample_does_not_depend_on_its_batch(unet: nn.Module) -> None:
    projection = ProjectionConfig(kind="kronecker", dim=512, seed=1)
    computer = FactoredGradientComputer(
        unet, default_scheduler_config(), OUTPUTS[0], projection, dtype=torch.float64
    )
    x0, noise = inputs(batch=3)
    together = computer.compute_features(x0, TIMESTEP, noise)
    alone = computer.compute_features(x0[1:2], TIMESTEP, noise[1:2])
    torch.testing.assert_close(together.features[1:2], alone.features, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(together.norms[1:2], alone.norms, rtol=1e-12, atol=0)


def test_selected_parameters_only(unet: nn.Module) -> None:
    patterns = ("*attentions*", "conv_out.weight", "*time_emb_proj.bias")
    computer = FactoredGradientComputer(
        unet,
        default_scheduler_config(),
        OUTPUTS[0],
        whole(unet, patterns),
        patterns,
        dtype=torch.float64,
    )
    # conv_out's bias is not selected (no bias column); time_emb_proj biases go to the rest.
    conv_out = next(b for b in computer.layout.blocks if b.module == "conv_out")
    assert conv_out.bias is None
    assert {r.role for r in computer.layout.rest} == {"scale", "shift", "bias"}
    x0, noise = inputs(batch=2)
    got = computer.compute_features(x0, TIMESTEP, noise)
    exact = GradientComputer(
        unet, default_scheduler_config(), OUTPUTS[0], patterns, dtype=torch.float64
    )
    grads = exact.compute(x0, TIMESTEP, noise).grads
    assert computer.proj_dim == grads.shape[2]
    torch.testing.assert_close(got.norms, grads.flatten(1).norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        got.features.square().sum(dim=2), grads.square().sum(dim=2), rtol=1e-10, atol=0
    )


def test_bf16_is_close_to_float32(unet: nn.Module) -> None:
    projection = ProjectionConfig(kind="kronecker", dim=512, seed=1)
    x0, noise = (t.float() for t in inputs(batch=2))
    results = {
        dtype: FactoredGradientComputer(
            unet, default_scheduler_config(), OUTPUTS[2], projection, dtype=dtype
        ).compute_features(x0, TIMESTEP, noise)
        for dtype in (torch.float32, torch.bfloat16)
    }
    low, high = results[torch.bfloat16], results[torch.float32]
    assert low.features.dtype == torch.float32
    cosine = nn.functional.cosine_similarity(low.features.flatten(1), high.features.flatten(1))
    assert (cosine > 0.95).all()


class _Convolutions(nn.Module):
    """Convolutions of every padding, stride and dilation form, and a small map (ghost norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(1, 6, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(6, 6, 3, padding="same", dilation=2, bias=False)
        self.strided = nn.Conv2d(6, 40, 3, stride=2, padding=1, padding_mode="circular")
        self.small = nn.Conv2d(40, 40, 2, stride=2)
        self.norm = nn.GroupNorm(4, 40)
        self.head = nn.Linear(40 * 2 * 2, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.same(torch.tanh(self.reflect(x))))
        h = self.norm(self.small(torch.tanh(self.strided(h))))
        return self.head(h.flatten(1)).view_as(x)


@pytest.mark.parametrize("dim", [0, 400], ids=["whole", "projected"])
def test_every_convolution_form_matches_exact_gradients(dim: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = _Convolutions().double()
    if dim == 0:
        projection = whole(model)
    else:
        projection = ProjectionConfig(kind="kronecker", dim=dim, factored_dim=5 * dim)
    computer = FactoredGradientComputer(
        model, default_scheduler_config(), OUTPUTS[0], projection, dtype=torch.float64
    )
    small = next(b for b in computer.layout.blocks if b.module == "small")
    # 2 x 2 outputs: with small factors the ghost norm (and unfolded patches) is cheaper.
    assert explicit_is_cheaper(small, 4) == (dim == 0)
    x0, noise = inputs(batch=3, seed=5)
    assert_equals_projected_exact_gradients(computer, x0, noise, rtol=1e-9)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.layer(self.layer(flat)).view_as(x)


class _WithBatchNorm(nn.Module):
    def __init__(self, track: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1, track_running_stats=track)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class _WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 4)
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.layer(x.flatten(1)) + self.embed(t)).view_as(x)


def test_a_layer_run_twice_is_refused() -> None:
    computer = FactoredGradientComputer(
        _Twice(), default_scheduler_config(), OUTPUTS[0], SMALL, dtype=torch.float64
    )
    x0 = torch.zeros((2, 1, 2, 2), dtype=torch.float64)
    with pytest.raises(ConfigError, match="layer ran twice"):
        computer.compute_features(x0, 10, torch.ones_like(x0))


def test_batch_statistics_are_refused_running_statistics_are_not() -> None:
    with pytest.raises(ConfigError, match="BatchNorm"):
        FactoredGradientComputer(
            _WithBatchNorm(track=False), default_scheduler_config(), OUTPUTS[0], SMALL
        )
    # Running statistics (eval mode, which the computer's copy is in) do not mix samples.
    FactoredGradientComputer(
        _WithBatchNorm(track=True),
        default_scheduler_config(),
        OUTPUTS[0],
        SMALL,
        parameters=("conv.*",),
    )


def test_uncovered_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match=r"embed\.weight \(Embedding\)"):
        FactoredGradientComputer(_WithEmbedding(), default_scheduler_config(), OUTPUTS[0], SMALL)
    computer = FactoredGradientComputer(
        _WithEmbedding(), default_scheduler_config(), OUTPUTS[0], SMALL, ("layer.*",)
    )
    assert [b.module for b in computer.layout.blocks] == ["layer"]


def test_wrong_images_are_data_errors(unet: nn.Module) -> None:
    computer = FactoredGradientComputer(unet, default_scheduler_config(), OUTPUTS[0], SMALL)
    with pytest.raises(DataError, match="expects"):
        computer.compute_features(torch.zeros((2, 1, 6, 6)), 10, torch.zeros((2, 1, 6, 6)))
    with pytest.raises(ConfigError, match="timestep"):
        computer.compute_features(torch.zeros((2, 1, 8, 8)), 5000, torch.zeros((2, 1, 8, 8)))


def test_empty_batch(unet: nn.Module) -> None:
    computer = FactoredGradientComputer(unet, default_scheduler_config(), OUTPUTS[3], whole(unet))
    empty = torch.zeros((0, 1, 8, 8))
    got = computer.compute_features(empty, 10, empty)
    assert got.features.shape == (0, 3, computer.proj_dim)
    assert got.norms.shape == (0,)
