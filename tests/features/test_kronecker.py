"""KroneckerLayout's budget rule and KroneckerProjector's map, without a diffusion model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffattr.errors import ConfigError
from diffattr.features import KroneckerLayout, KroneckerProjector, ProjectionConfig
from diffattr.features._kronecker import uncovered_parameters


def make_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.GroupNorm(2, 6),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 20),
            nn.LayerNorm(20),
            nn.Linear(20, 5, bias=False),
        )


def names(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_parameters()]


def layout(
    dim: int, net: nn.Module | None = None, seed: int = 0, factored_dim: int | None = None
) -> KroneckerLayout:
    """A single-stage layout (factored features = k) unless ``factored_dim`` says otherwise."""
    net = net or make_net()
    config = ProjectionConfig(
        kind="kronecker", dim=dim, seed=seed, factored_dim=factored_dim or dim
    )
    return KroneckerLayout(net, names(net), config)


def test_budget_rule() -> None:
    got = layout(300)
    dims = [(b.module, b.d_out, b.d_in) for b in got.blocks]
    assert dims == [("0", 6, 2 * 9 + 1), ("3", 20, 96 + 1), ("5", 5, 20)]
    # Weights and biases are 2,154 of the 2,206 values: their share of 300 is 292.
    assert got.factor == 12
    assert [(b.k_out, b.k_in) for b in got.blocks] == [(6, 12), (12, 12), (5, 12)]
    assert got.rest_numel == 2 * 6 + 2 * 20
    assert got.rest_dim == 300 - (72 + 144 + 60)
    assert got.proj_dim == got.factored_dim == 300
    assert KroneckerProjector(got)._final is None


def test_two_stages_factored_features_then_sparse_to_k() -> None:
    got = layout(100, factored_dim=1000)
    assert got.factored_dim == 1000 > got.proj_dim == 100
    assert got.to_dict()["final"] == "sparse"
    # The default factored stage is 64 k: here more than every parameter, so whole.
    default = KroneckerLayout(
        make_net(), names(make_net()), ProjectionConfig(kind="kronecker", dim=100)
    )
    assert default.factored_dim == default.grad_dim
    assert default.proj_dim == 100
    grads = torch.randn((3, got.grad_dim), dtype=torch.float64)
    assert KroneckerProjector(got).project(grads).shape == (3, 100)


def test_a_budget_above_the_parameter_count_keeps_everything_whole() -> None:
    got = layout(2206)
    assert all((b.k_out, b.k_in) == (b.d_out, b.d_in) for b in got.blocks)
    assert got.rest_dim == got.rest_numel
    assert got.proj_dim == got.grad_dim


def test_whole_factors_are_a_rearrangement() -> None:
    got = layout(2206)
    projector = KroneckerProjector(got)
    grads = torch.randn((3, got.grad_dim), dtype=torch.float64)
    features = projector.project(grads)
    assert torch.equal(features.sort(dim=1).values, grads.sort(dim=1).values)


def test_projection_preserves_inner_products_on_average() -> None:
    """E <P g, P h> = <g, h>: check the mean over 200 seeds against its standard error."""
    net = make_net()
    draw = torch.Generator().manual_seed(0)
    g, h = torch.randn((2, sum(p.numel() for p in net.parameters())), generator=draw).double()
    h = 0.6 * g + 0.8 * h  # correlated, so the inner product is far from zero
    ratios = []
    for seed in range(200):
        # Alternate single-stage and two-stage layouts: both are unbiased.
        factored_dim = 150 if seed % 2 else 600
        projector = KroneckerProjector(layout(150, net, seed=seed, factored_dim=factored_dim))
        pg, ph = projector.project(torch.stack([g, h]))
        ratios.append(float(pg @ ph) / float(g @ h))
    ratios_t = torch.tensor(ratios)
    standard_error = ratios_t.std() / len(ratios) ** 0.5
    assert abs(ratios_t.mean() - 1) < 4 * standard_error
    assert ratios_t.std() < 0.5


def test_factors_depend_on_the_layer_not_on_the_other_layers() -> None:
    net = make_net()
    full = layout(300, net, seed=4)
    only_two = KroneckerLayout(
        net,
        ["3.weight", "3.bias", "5.weight"],
        ProjectionConfig(kind="kronecker", dim=210, factored_dim=210, seed=4),
    )
    block = next(b for b in only_two.blocks if b.module == "5")
    reference = next(b for b in full.blocks if b.module == "5")
    assert (block.k_out, block.k_in) == (reference.k_out, reference.k_in) == (5, 12)
    for a, b in zip(
        full.factors(reference, dtype=torch.float64, device="cpu"),
        only_two.factors(block, dtype=torch.float64, device="cpu"),
        strict=True,
    ):
        assert torch.equal(a, b)
    other_seed = layout(300, net)
    assert not torch.equal(
        full.factors(full.blocks[1], dtype=torch.float64, device="cpu")[1],
        other_seed.factors(other_seed.blocks[1], dtype=torch.float64, device="cpu")[1],
    )


def test_too_small_or_too_large_a_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="too small"):
        layout(2)
    with pytest.raises(ConfigError, match="exceeds the number of parameters"):
        layout(2207)


def test_other_kinds_and_uncovered_modules_are_refused() -> None:
    net = make_net()
    with pytest.raises(ConfigError, match="kind='kronecker'"):
        KroneckerLayout(net, names(net), ProjectionConfig(kind="dense", dim=10))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped"):
        KroneckerLayout(grouped, names(grouped), ProjectionConfig(kind="kronecker", dim=10))
    embedded = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"0\.weight \(Embedding\)"):
        KroneckerLayout(embedded, names(embedded), ProjectionConfig(kind="kronecker", dim=10))
    assert uncovered_parameters(embedded, names(embedded)) == ["0.weight"]
    assert uncovered_parameters(make_net(), names(make_net())) == []


def test_describe_lists_every_layer_and_the_total() -> None:
    lines = layout(300).describe()
    assert len(lines) == 3 + 1 + 2  # layers, the rest, factored size, total
    assert lines[-1].strip().startswith("total k = 300")
