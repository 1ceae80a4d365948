"""The curvature stage: K-FAC and EK-FAC against the exact Gauss-Newton matrix, the eigenbasis
projection against exact gradients, resumption, refusals and the seeded Fisher directions.

The exact G is formed from exact Jacobians (vmap, all D orthonormal output directions) in
float64 on two small models: a convolutional one (weight sharing over pixels, GroupNorm in the
rest) and mlp-tiny (one position per layer, LayerNorms in the rest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreCorruptError, StoreMismatchError
from diffattr.features import (
    FeatureConfig,
    GradientComputer,
    KroneckerLayout,
    KroneckerProjector,
    OutputConfig,
    Plan,
    PlanConfig,
    ProjectionConfig,
    _curvature,
)
from diffattr.features._curvature import (
    CurvatureConfig,
    estimate_curvature,
    full_projection,
    output_directions,
)
from diffattr.features._preconditioned import PreconditionedFeaturizer, preconditioned_computer
from diffattr.methods import EKFAC, KFAC, InfluenceConfig
from diffattr.models import build_model, default_scheduler_config, model_spec

SIDE = 4
PIXELS = SIDE * SIDE
PLAN = PlanConfig(strategy="uniform", num_steps=2, seed=1, noise="per_sample")
EXACT_FISHER = CurvatureConfig(fisher="exact")


class TinyConv(nn.Module):
    """Two 3x3 convolutions, a GroupNorm and a timestep Linear: weight sharing over 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.time = nn.Linear(2, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(x_t.shape[0]) / 1000
        embedding = self.time(torch.stack([torch.sin(3 * time), torch.cos(3 * time)], dim=1))
        hidden = self.norm(self.conv1(x_t) + embedding[:, :, None, None])
        return self.conv2(nn.functional.silu(hidden))


def _model(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "conv":
            model: nn.Module = TinyConv()
        else:
            spec = model_spec(
                "mlp-tiny", in_channels=1, sample_size=SIDE, overrides={"width": 8, "depth": 1}
            )
            model = build_model(spec)
        model = model.double()
        for param in model.parameters():
            nn.init.normal_(param, std=0.5 if name == "conv" else 0.3)
    return model


def _images(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, SIDE, SIDE), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=np.arange(first_id, first_id + n), name=f"x{seed}")


TRAIN, QUERY = _images(32, 0, 0), _images(6, 1, 500)


def _features(model: nn.Module) -> FeatureConfig:
    return FeatureConfig(
        plan=PLAN, projection=full_projection(model, None), dtype="float64", backend="factored"
    )


class Exact:
    """The exact G and loss gradients of a model, in the layout's block order."""

    def __init__(self, model: nn.Module) -> None:
        self.layout = KroneckerLayout(
            model, [n for n, _ in model.named_parameters()], full_projection(model, None)
        )
        # With identity factors the Kronecker map only reorders: (d_out, d_in) blocks, then rest.
        self.reorder = KroneckerProjector(self.layout)
        self.p = self.layout.grad_dim
        self.plan = Plan.build(PLAN)
        scheduler = default_scheduler_config()
        self.model = model
        jacobian = GradientComputer(
            model,
            scheduler,
            OutputConfig(kind="output_projection", num_directions=PIXELS),
            dtype=torch.float64,
        )
        self.loss = GradientComputer(
            model, scheduler, OutputConfig(kind="loss"), dtype=torch.float64
        )
        self.gauss_newton = np.zeros((self.p, self.p))
        for step, t in enumerate(self.plan.timesteps):
            noise = self.plan.noise_for(step, TRAIN.ids, (1, SIDE, SIDE))
            rows = jacobian.compute(TRAIN.images.double(), int(t), noise).grads  # (N, D, p)
            blocks = self.reorder.project(rows.reshape(-1, self.p)).numpy()
            self.gauss_newton += 2 / PIXELS * blocks.T @ blocks
        self.gauss_newton /= len(TRAIN) * len(self.plan)
        sizes = [b.d_out * b.d_in for b in self.layout.blocks] + [self.layout.rest_numel]
        self.offsets = np.cumsum([0, *sizes])

    def gradients(self, data: ImageDataset) -> np.ndarray:
        total = 0.0
        for step, t in enumerate(self.plan.timesteps):
            noise = self.plan.noise_for(step, data.ids, (1, SIDE, SIDE))
            grads = self.loss.compute(data.images.double(), int(t), noise).grads[:, 0]
            total = total + self.reorder.project(grads).numpy()
        return total / len(self.plan)

    def approximation(self, curvature: _curvature.Curvature, kind: str) -> np.ndarray:
        """K-FAC's S (x) A or EK-FAC's Q diag(Lambda) Q^T per layer; the rest's diagonal."""
        approx = np.zeros((self.p, self.p))
        for index, block in enumerate(self.layout.blocks):
            layer = curvature.layers[block.module]
            span = slice(self.offsets[index], self.offsets[index + 1])
            if kind == "kfac":
                approx[span, span] = np.kron(layer.s, layer.a)
            else:
                basis = np.kron(layer.s_basis, layer.a_basis)
                approx[span, span] = basis @ np.diag(layer.ekfac.reshape(-1)) @ basis.T
        if self.layout.rest:
            span = slice(self.offsets[-2], self.offsets[-1])
            approx[span, span] = np.diag(curvature.rest)
        return approx

    def block_mask(self) -> np.ndarray:
        mask = np.zeros((self.p, self.p), dtype=bool)
        for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            mask[start:stop, start:stop] = True
        return mask


@pytest.fixture(scope="module", params=["conv", "mlp"])
def exact(request: pytest.FixtureRequest) -> Exact:
    return Exact(_model(request.param))


def _errors(exact: Exact, root: Path, estimate: CurvatureConfig) -> dict[str, dict[str, float]]:
    """Relative Frobenius errors against G and influence correlations with exact-G influence."""
    features = _features(exact.model)
    curvature = estimate_curvature(
        exact.model,
        default_scheduler_config(),
        TRAIN,
        features,
        estimate,
        root / "curvature",
        model_id="m",
        batch_size=8,
        progress=False,
    )
    g_query, g_train = exact.gradients(QUERY), exact.gradients(TRAIN)
    # The same damping rule for the exact G: 0.01 x its mean eigenvalue.
    lam = 0.01 * np.trace(exact.gauss_newton) / exact.p
    truth = g_query @ np.linalg.solve(exact.gauss_newton + lam * np.eye(exact.p), g_train.T)
    mask = exact.block_mask()
    out = {}
    for kind, method_cls in (("kfac", KFAC), ("ekfac", EKFAC)):
        difference = exact.approximation(curvature, kind) - exact.gauss_newton
        method = method_cls(InfluenceConfig(route="exact", ggn=estimate))
        featurize = PreconditionedFeaturizer(
            exact.model,
            default_scheduler_config(),
            TRAIN,
            method.features(features),
            estimate,
            root,
            kind=kind,
            damping=0.01,
            exact=True,
            kernel_units=False,
            model_id="m",
            batch_size=8,
            progress=False,
        )
        scores = method.fit(featurize(TRAIN, "train")).score(featurize(QUERY, "query")).values
        out[kind] = {
            "error": np.linalg.norm(difference) / np.linalg.norm(exact.gauss_newton),
            "block error": np.linalg.norm(difference[mask])
            / np.linalg.norm(exact.gauss_newton[mask]),
            "pearson": np.mean(
                [np.corrcoef(s, t)[0, 1] for s, t in zip(scores, truth, strict=True)]
            ),
            "spearman": np.mean(
                [scipy.stats.spearmanr(s, t)[0] for s, t in zip(scores, truth, strict=True)]
            ),
        }
    return out


def _show(name: str, errors: dict[str, dict[str, float]]) -> None:
    for kind, values in errors.items():
        shown = ", ".join(f"{key} {value:.3f}" for key, value in values.items())
        print(f"\n{name} {kind}: {shown}", end="")


def test_kfac_and_ekfac_against_the_exact_gauss_newton_matrix(exact: Exact, tmp_path: Path) -> None:
    errors = _errors(exact, tmp_path / "exact", EXACT_FISHER)
    _show(f"{type(exact.model).__name__} (p = {exact.p}), exact Fisher, expand:", errors)
    # In K-FAC's basis EK-FAC's eigenvalues are the Frobenius-best diagonal of each block.
    assert errors["ekfac"]["block error"] <= errors["kfac"]["block error"] + 1e-12
    for values in errors.values():
        assert values["block error"] < 0.8
        assert values["pearson"] > 0.5
        assert values["spearman"] > 0.5
    assert errors["ekfac"]["pearson"] >= errors["kfac"]["pearson"] - 0.02
    sampled = _errors(exact, tmp_path / "sampled", CurvatureConfig(samples=1, seed=3))
    _show("  sampled Fisher (1 direction):", sampled)
    for kind in ("kfac", "ekfac"):
        assert sampled[kind]["block error"] < errors[kind]["block error"] + 0.25


def test_expand_fits_convolutions_better_than_reduce(tmp_path: Path) -> None:
    exact = Exact(_model("conv"))
    expand = _errors(exact, tmp_path / "expand", EXACT_FISHER)
    reduce = _errors(exact, tmp_path / "reduce", CurvatureConfig(fisher="exact", sharing="reduce"))
    _show("TinyConv, K-FAC-reduce:", reduce)
    for kind in ("kfac", "ekfac"):
        assert expand[kind]["block error"] < reduce[kind]["block error"]


@pytest.mark.parametrize("name", ["conv", "mlp"])
@pytest.mark.parametrize("exact_route", [True, False])
def test_preconditioned_features_are_the_rotated_exact_gradients(
    name: str, exact_route: bool, tmp_path: Path
) -> None:
    """The hooks' Q_S^T G Q_A / sqrt(Lambda + lambda) against the same map on vmap gradients."""
    model = _model(name)
    features = _features(model)
    if not exact_route:  # top eigenvectors within a small budget, then the sparse stage
        features = FeatureConfig(
            plan=PLAN,
            projection=ProjectionConfig(kind="kronecker", dim=24, factored_dim=60, seed=1),
            dtype="float64",
            backend="factored",
        )
    curvature = estimate_curvature(
        model,
        default_scheduler_config(),
        TRAIN.select(TRAIN.ids[:8]),
        _features(model),
        CurvatureConfig(seed=1),
        tmp_path,
        model_id="m",
        progress=False,
    )
    computer = preconditioned_computer(
        model,
        default_scheduler_config(),
        features,
        curvature,
        kind="ekfac",
        damping=0.05,
        scale=0.5,
        exact=exact_route,
    )
    reference = GradientComputer(
        model, default_scheduler_config(), features.output, dtype=torch.float64
    )
    noise = torch.randn((3, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(2))
    x0 = QUERY.images[:3].double()
    got = computer.compute_features(x0, 400, noise).features[:, 0]
    grads = reference.compute(x0, 400, noise).grads[:, 0]
    expected = computer.projector.project(grads)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert computer.proj_dim == (curvature.num_parameters if exact_route else 24)


def _stage(root: Path, estimate: CurvatureConfig = EXACT_FISHER, **options: object):
    model = _model("conv")
    return estimate_curvature(
        model,
        default_scheduler_config(),
        TRAIN,
        _features(model),
        estimate,
        root,
        model_id="m",
        progress=False,
        **options,
    )


def test_an_interrupted_stage_resumes_to_the_same_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _stage(tmp_path / "whole", batch_size=4, chunk_size=8)
    original = _curvature._Pass._batch
    calls = {"n": 0}

    def failing(self: _curvature._Pass, ids: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 13:  # in the second pass, after its first chunk was saved
            raise KeyboardInterrupt
        original(self, ids)

    monkeypatch.setattr(_curvature._Pass, "_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "resumed", batch_size=4, chunk_size=8)
    assert (tmp_path / "resumed" / "partial-eigenvalues-part-000-of-001.safetensors").is_file()
    monkeypatch.setattr(_curvature._Pass, "_batch", original)
    resumed = _stage(tmp_path / "resumed", batch_size=4, chunk_size=8)
    for name, value in whole.to_arrays().items():
        np.testing.assert_array_equal(resumed.to_arrays()[name], value, err_msg=name)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "curvature.json",
        "curvature.safetensors",
    ]
    # Batch and chunk sizes change nothing but memory: the estimate is found and loaded.
    again = _stage(tmp_path / "resumed", batch_size=32, chunk_size=5)
    assert again.sha256 == whole.sha256 == resumed.sha256


def test_other_settings_are_refused_and_changed_files_detected(tmp_path: Path) -> None:
    _stage(tmp_path)
    with pytest.raises(StoreMismatchError, match="curvature"):
        _stage(tmp_path, CurvatureConfig(fisher="exact", sharing="reduce"))
    data = bytearray((tmp_path / "curvature.safetensors").read_bytes())
    data[-5] ^= 0x10
    (tmp_path / "curvature.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="changed"):
        _stage(tmp_path)


def test_sampled_directions_come_from_the_recorded_seed() -> None:
    config = CurvatureConfig(samples=3, seed=7)
    ids = np.array([4, 9])
    first = output_directions(config, 1, ids, PIXELS)
    assert first.shape == (2, 3, PIXELS)
    torch.testing.assert_close(first, output_directions(config, 1, ids, PIXELS))
    # A sample's draw depends on its id and step only, not on its batch.
    torch.testing.assert_close(first[1:], output_directions(config, 1, ids[1:], PIXELS))
    assert not torch.equal(first, output_directions(CurvatureConfig(samples=3), 1, ids, PIXELS))
    assert not torch.equal(first, output_directions(config, 2, ids, PIXELS))
    many = output_directions(CurvatureConfig(samples=4000), 0, np.array([0]), PIXELS)[0]
    second_moment = (many.T @ many).numpy()  # sum over the draws: (2 / D) I in expectation
    np.testing.assert_allclose(second_moment, 2 / PIXELS * np.eye(PIXELS), atol=0.02)
    exact = output_directions(EXACT_FISHER, 0, ids, PIXELS)
    np.testing.assert_allclose((exact[0].T @ exact[0]).numpy(), 2 / PIXELS * np.eye(PIXELS))


@pytest.mark.parametrize(
    "changes",
    [{"fisher": "empirical"}, {"samples": 0}, {"sharing": "mean"}, {"seed": 1.5}],
)
def test_invalid_curvature_config_is_config_error(changes: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(changes))):
        CurvatureConfig(**changes)


def test_config_round_trip() -> None:
    config = CurvatureConfig(fisher="exact", samples=2, sharing="reduce", seed=4)
    assert CurvatureConfig.from_dict(config.to_dict()) == config
