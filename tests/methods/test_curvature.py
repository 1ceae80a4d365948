"""K-FAC / EK-FAC influence and DAS with curvature, against exact answers.

One Linear layer on fixed random features, eps_hat = W psi(x_t, t) + b, fitted to its exact
least-squares optimum: K-FAC's S (x) A is then the exact Gauss-Newton matrix (with the exact
Fisher), so influence is exactly g_x^T G^-1 g_i, the Newton step's prediction, and DAS with
curvature is exactly the leave-one-out change, as in tests/methods/test_das_exact.py for the kernel.
The plan has per-sample noise: with one draw shared by every image the bias alone would fit the
targets and every residual would vanish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreMismatchError
from diffattr.features import (
    FeatureConfig,
    GradientComputer,
    OutputConfig,
    Plan,
    PlanConfig,
    ProjectionConfig,
)
from diffattr.features._curvature import CurvatureConfig, estimate_curvature
from diffattr.features._preconditioned import PreconditionedFeaturizer
from diffattr.methods import (
    DAS,
    EKFAC,
    KFAC,
    AttributionMethod,
    DASConfig,
    InfluenceConfig,
    Scores,
)
from diffattr.methods._base import Featurizer
from diffattr.models import default_scheduler_config

from .helpers import BASE, DATASETS, StoreFactory

N_TRAIN, N_QUERY, SIDE, N_FEATURES = 60, 8, 2, 8
PIXELS = SIDE * SIDE
#: Weights (PIXELS x N_FEATURES) and the bias: the layer's (d_out, d_in) block.
P = PIXELS * (N_FEATURES + 1)
PLAN = PlanConfig(strategy="explicit", timesteps=(300,), seed=3, noise="per_sample")
EXACT_FISHER = CurvatureConfig(fisher="exact")
#: Every parameter, in float64: the projected route then keeps every eigenvector.
FEATURES = FeatureConfig(
    plan=PLAN, projection=ProjectionConfig(kind="kronecker", dim=P), dtype="float64"
)


class LinearHead(nn.Module):
    """eps_hat = Linear(tanh([x_t, sin 3t, cos 3t] M)): one Linear layer on fixed features."""

    def __init__(self) -> None:
        super().__init__()
        draw = torch.Generator().manual_seed(0)
        mix = torch.randn(PIXELS + 2, N_FEATURES, generator=draw, dtype=torch.float64)
        self.register_buffer("mix", mix)
        self.head = nn.Linear(N_FEATURES, PIXELS, dtype=torch.float64)

    def psi(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        time = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(batch) / 1000
        inputs = torch.cat(
            [x_t.reshape(batch, -1), torch.sin(3 * time)[:, None], torch.cos(3 * time)[:, None]],
            dim=1,
        )
        return torch.tanh(inputs @ self.mix)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.psi(x_t, t)).reshape(x_t.shape)


def _images(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, SIDE, SIDE), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=np.arange(first_id, first_id + n), name=f"head{seed}")


def _design(model: LinearHead, data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [psi, 1] (n, F + 1) and noise targets (n, D) at the plan's single step."""
    plan = Plan.build(PLAN)
    abar = DDPMScheduler.from_config(default_scheduler_config()).alphas_cumprod.double()
    t = plan.timesteps[0]
    noise = plan.noise_for(0, data.ids, (1, SIDE, SIDE)).double()
    x_t = abar[t].sqrt() * data.images.double() + (1 - abar[t]).sqrt() * noise
    with torch.no_grad():
        psi = model.psi(x_t, torch.tensor([t])).numpy()
    return np.hstack([psi, np.ones((len(psi), 1))]), noise.reshape(len(data), -1).numpy()


def _loss_gradients(model: LinearHead, data: ImageDataset) -> np.ndarray:
    """Exact per-sample loss gradients (vmap) as the layer's (d_out, d_in) blocks, flattened."""
    computer = GradientComputer(
        model, default_scheduler_config(), OutputConfig(kind="loss"), dtype=torch.float64
    )
    plan = Plan.build(PLAN)
    noise = plan.noise_for(0, data.ids, (1, SIDE, SIDE))
    grads = computer.compute(data.images.double(), int(plan.timesteps[0]), noise).grads[:, 0]
    weight, bias = grads[:, : P - PIXELS], grads[:, P - PIXELS :]
    blocks = torch.cat([weight.reshape(-1, PIXELS, N_FEATURES), bias[:, :, None]], dim=2)
    return blocks.reshape(len(data), P).numpy()


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = LinearHead()
    train, query = _images(N_TRAIN, 1, 0), _images(N_QUERY, 2, 1000)
    inputs, targets = _design(model, train)
    solution, *_ = np.linalg.lstsq(inputs, targets, rcond=None)  # (F + 1, D)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(solution[:-1].T))
        model.head.bias.copy_(torch.from_numpy(solution[-1]))
    query_inputs, _ = _design(model, query)
    change = np.empty((N_QUERY, N_TRAIN, PIXELS))
    for i in range(N_TRAIN):
        keep = np.arange(N_TRAIN) != i
        refit, *_ = np.linalg.lstsq(inputs[keep], targets[keep], rcond=None)
        change[:, i] = query_inputs @ (solution - refit)  # prediction with z_i minus without
    # G = E[J^T (2/D) J] with J = I_D (x) [psi, 1]^T per sample (row-major (d_out, d_in) blocks).
    gauss_newton = np.kron(2 / PIXELS * np.eye(PIXELS), inputs.T @ inputs / N_TRAIN)
    return {
        "model": model,
        "train": train,
        "query": query,
        "change": change,
        "gauss_newton": gauss_newton,
        "train_grads": _loss_gradients(model, train),
        "query_grads": _loss_gradients(model, query),
        "root": tmp_path_factory.mktemp("curvature-exact"),
    }


def _featurizer(setting: dict, method: AttributionMethod) -> Featurizer:
    featurize = method.featurizer(
        setting["model"],
        default_scheduler_config(),
        setting["train"],
        method.features(FEATURES),
        setting["root"],
        model_id="head",
        batch_size=16,
        chunk_size=32,
        progress=False,
    )
    assert featurize is not None
    return featurize


def _scores(setting: dict, method: AttributionMethod) -> Scores:
    featurize = _featurizer(setting, method)
    train, query = featurize(setting["train"], "train"), featurize(setting["query"], "query")
    return method.fit(train).score(query)


def test_kfac_of_one_linear_layer_is_the_exact_gauss_newton_matrix(setting: dict) -> None:
    curvature = estimate_curvature(
        setting["model"],
        default_scheduler_config(),
        setting["train"],
        FEATURES,
        EXACT_FISHER,
        setting["root"] / "kfac-check",
        model_id="head",
        progress=False,
    )
    layer = curvature.layers["head"]
    np.testing.assert_allclose(
        np.kron(layer.s, layer.a), setting["gauss_newton"], rtol=0, atol=1e-14
    )
    # The K-FAC basis diagonalises the exact G, so EK-FAC's correction changes nothing.
    kfac = np.outer(layer.s_eigenvalues, layer.a_eigenvalues)
    np.testing.assert_allclose(layer.ekfac, kfac, rtol=1e-12, atol=1e-15)
    assert curvature.n_images == N_TRAIN
    assert curvature.output_size == PIXELS


@pytest.mark.parametrize("route", ["exact", "projected"])
@pytest.mark.parametrize("method_cls", [KFAC, EKFAC])
def test_influence_is_the_exact_newton_step(setting: dict, method_cls: type, route: str) -> None:
    method = method_cls(InfluenceConfig(damping=0.0, route=route, ggn=EXACT_FISHER))
    scores = _scores(setting, method)
    # g_x^T G^-1 g_i: N times the query loss's first-order change under the Newton step
    # (1/N) G^-1 g_i that removes z_i from the mean loss (G is the exact Hessian here).
    newton = setting["query_grads"] @ np.linalg.solve(
        setting["gauss_newton"], setting["train_grads"].T
    )
    scale = np.abs(newton).max()
    np.testing.assert_allclose(scores.values, newton, rtol=1e-5, atol=1e-6 * scale)
    assert scores.settings["lambda"] == [0.0]
    assert scores.settings["preconditioner"][0]["kind"] == method.kind


@pytest.mark.parametrize("route", ["exact", "projected"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_das_with_curvature_is_the_exact_leave_one_out_change(
    setting: dict, curvature: str, route: str
) -> None:
    config = DASConfig(
        output="output_projection",
        num_directions=PIXELS,
        damping=0.0,
        curvature=curvature,
        route=route,
        ggn=EXACT_FISHER,
    )
    scores = _scores(setting, DAS(config)).values.astype(np.float64)
    exact = (setting["change"] ** 2).sum(axis=2)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-8 * exact.max())


def test_das_with_curvature_linear_form_is_the_signed_change(setting: dict) -> None:
    # One direction of the output: the signed change along it, as for the kernel form.
    config = DASConfig(
        output="output_projection",
        num_directions=1,
        damping=0.0,
        transform="linear",
        residual="signed",
        curvature="ekfac",
        ggn=EXACT_FISHER,
    )
    method = DAS(config)
    scores = _scores(setting, method).values
    from diffattr.features._outputs import output_directions

    seed = method.features(FEATURES).output.seed
    direction = output_directions(1, PIXELS, seed, dtype=torch.float64)[0].numpy()
    exact = setting["change"] @ direction
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.5


def test_sampled_fisher_is_close_to_the_exact_one(setting: dict) -> None:
    sampled = estimate_curvature(
        setting["model"],
        default_scheduler_config(),
        setting["train"],
        FEATURES,
        CurvatureConfig(fisher="sampled", samples=16, seed=5),
        setting["root"] / "sampled",
        model_id="head",
        progress=False,
    )
    layer = sampled.layers["head"]
    error = np.linalg.norm(np.kron(layer.s, layer.a) - setting["gauss_newton"])
    # 60 images x 16 directions estimate S = (2/D) I: a relative error of about 1/sqrt(960 / 4).
    assert error / np.linalg.norm(setting["gauss_newton"]) < 0.15


def test_features_are_refused_with_another_damping(setting: dict) -> None:
    method = EKFAC(InfluenceConfig(damping=1e-3, route="projected", ggn=EXACT_FISHER))
    train = _featurizer(setting, method)(setting["train"], "train")
    other = EKFAC(InfluenceConfig(damping=1e-2, route="projected", ggn=EXACT_FISHER))
    with pytest.raises(StoreMismatchError, match="damping"):
        other.fit(train)
    with pytest.raises(StoreMismatchError, match="kfac"):
        KFAC(InfluenceConfig(damping=1e-3, route="projected")).fit(train)


# ------------------------------------------------------------------- the two routes, mlp-tiny

MLP_P = 5072  # mlp-tiny, width 16, depth 1, 8 x 8 images: layers, LayerNorms and biases


@pytest.fixture(scope="module")
def mlp_routes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """EK-FAC influence on the tiny MLP of the method tests: the exact route and three budgets."""
    stores = StoreFactory(tmp_path_factory.mktemp("routes"))
    model, train, query = stores.model(0), DATASETS["train"], DATASETS["query"]
    out = {}
    for name, route, dim, factored in (
        ("exact", "exact", 64, 0),
        ("projected, k = p", "projected", MLP_P, 0),
        ("projected, k = 64", "projected", 64, 0),
        ("projected, 1024 then 64", "projected", 64, 1024),
    ):
        method = EKFAC(InfluenceConfig(route=route))
        projection = ProjectionConfig(dim=dim, factored_dim=factored)
        features = method.features(FeatureConfig(plan=BASE.plan, projection=projection))
        featurize = method.featurizer(
            model,
            default_scheduler_config(),
            train,
            features,
            stores.root,
            model_id="mlp",
            batch_size=8,
            chunk_size=8,
            progress=False,
        )
        out[name] = method.fit(featurize(train, "train")).score(featurize(query, "query"))
    return out


def test_projected_route_with_every_eigenvector_is_the_exact_route(mlp_routes: dict) -> None:
    exact = mlp_routes["exact"].values.astype(np.float64)
    full = mlp_routes["projected, k = p"].values.astype(np.float64)
    np.testing.assert_allclose(full, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
    assert (
        mlp_routes["projected, k = p"].settings["lambda"] == mlp_routes["exact"].settings["lambda"]
    )


def test_truncation_error_of_the_projected_route(mlp_routes: dict) -> None:
    exact = mlp_routes["exact"].values.astype(np.float64)
    lines = []
    for name in ("projected, k = 64", "projected, 1024 then 64"):
        got = mlp_routes[name].values.astype(np.float64)
        error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        rho = np.mean([scipy.stats.spearmanr(g, e)[0] for g, e in zip(got, exact, strict=True)])
        lines.append(f"{name}: relative error {error:.3f}, rank correlation {rho:.3f}")
        # The top eigen-directions carry little of g^T (G + lambda I)^-1 g, whose weight
        # 1 / (Lambda + lambda) is largest in the directions dropped: rankings survive better.
        assert error < 1.0
        assert rho > 0.0
    print(f"\nEK-FAC, projected against exact (mlp-tiny, p = {MLP_P}): " + "; ".join(lines))


def test_invalid_influence_config_is_config_error() -> None:
    with pytest.raises(ConfigError, match="route"):
        InfluenceConfig(route="approximate")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="damping"):
        InfluenceConfig(damping=-1.0)
    with pytest.raises(ConfigError, match="ggn"):
        InfluenceConfig(ggn={"fisher": "exact"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="curvature"):
        DASConfig(curvature="fisher")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="route"):
        DASConfig(curvature="ekfac", route="streamed")  # type: ignore[arg-type]


def test_influence_features_are_unnormalised_loss_gradients_on_the_factored_backend() -> None:
    features = EKFAC().features(BASE)
    assert features.output.kind == "loss"
    assert not features.normalize
    assert features.backend == "factored"
    assert features.projection.kind == "kronecker"
    assert features.projection.factored_dim == features.projection.dim  # one stage by default
    assert DAS(DASConfig(curvature="ekfac")).features(BASE).normalize is False


def test_exact_route_is_refused_under_torchrun(setting: dict, tmp_path: Path) -> None:
    from diffattr.features import Distributed

    with pytest.raises(ConfigError, match="projected"):
        PreconditionedFeaturizer(
            setting["model"],
            default_scheduler_config(),
            setting["train"],
            FEATURES,
            EXACT_FISHER,
            tmp_path,
            kind="ekfac",
            damping=0.01,
            exact=True,
            kernel_units=False,
            model_id="head",
            distributed=Distributed(rank=0, world_size=2),
        )
