"""Exact leave-one-out tests: the formulas of DAS and TRAK against retraining from scratch.

The model is linear in its parameters, eps_hat = psi(x_t, t) W with fixed random features psi,
and is trained to its exact least-squares optimum on the plan's (t, noise) draws. Removing a
training image and refitting is then exact, and so is DAS's linearisation plus one Newton step
with the Sherman-Morrison leverage correction: the two must agree to machine precision.
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
from diffattr.features import (
    FeatureConfig,
    Plan,
    PlanConfig,
    ProjectionConfig,
    featurize,
)
from diffattr.methods import DAS, TRAK, DASConfig, TRAKConfig
from diffattr.models import default_scheduler_config

N_TRAIN, N_QUERY, SIDE, N_FEATURES = 60, 8, 2, 8
PIXELS = SIDE * SIDE
PLAN = PlanConfig(strategy="explicit", timesteps=(300,), seed=3)


class LinearDenoiser(nn.Module):
    """eps_hat = tanh([x_t, sin 3t, cos 3t] A) W: linear in its parameters W."""

    def __init__(self) -> None:
        super().__init__()
        draw = torch.Generator().manual_seed(0)
        mix = torch.randn(PIXELS + 2, N_FEATURES, generator=draw, dtype=torch.float64)
        self.register_buffer("mix", mix)
        self.weight = nn.Parameter(torch.zeros(N_FEATURES, PIXELS, dtype=torch.float64))

    def psi(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        time = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(batch)
        time = time / 1000
        inputs = torch.cat(
            [x_t.reshape(batch, -1), torch.sin(3 * time)[:, None], torch.cos(3 * time)[:, None]],
            dim=1,
        )
        return torch.tanh(inputs @ self.mix)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.psi(x_t, t) @ self.weight).reshape(x_t.shape)


def _images(n: int, seed: int, first_id: int) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, SIDE, SIDE), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=np.arange(first_id, first_id + n), name=f"lin{seed}")


def _design(model: LinearDenoiser, data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Features psi (n, F) and noise targets (n, D) at the plan's single step."""
    plan = Plan.build(PLAN)
    abar = DDPMScheduler.from_config(default_scheduler_config()).alphas_cumprod.double()
    t = plan.timesteps[0]
    noise = plan.noise_for(0, data.ids, (1, SIDE, SIDE)).double()
    x_t = abar[t].sqrt() * data.images.double() + (1 - abar[t]).sqrt() * noise
    with torch.no_grad():
        psi = model.psi(x_t, torch.tensor([t]))
    return psi.numpy(), noise.reshape(len(data), -1).numpy()


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = LinearDenoiser()
    train, query = _images(N_TRAIN, 1, 0), _images(N_QUERY, 2, 1000)
    psi, targets = _design(model, train)
    weight, *_ = np.linalg.lstsq(psi, targets, rcond=None)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
    query_psi, query_noise = _design(model, query)
    # Exact leave-one-out: refit without sample i, record the query predictions' change.
    change = np.empty((N_QUERY, N_TRAIN, PIXELS))
    loss_change = np.empty((N_QUERY, N_TRAIN))
    base_loss = ((query_noise - query_psi @ weight) ** 2).mean(axis=1)
    for i in range(N_TRAIN):
        keep = np.arange(N_TRAIN) != i
        refit, *_ = np.linalg.lstsq(psi[keep], targets[keep], rcond=None)
        change[:, i] = query_psi @ (weight - refit)  # prediction with z_i minus without
        loss_change[:, i] = ((query_noise - query_psi @ refit) ** 2).mean(axis=1) - base_loss
    return {
        "model": model,
        "train": train,
        "query": query,
        "change": change,
        "loss_change": loss_change,
        "root": tmp_path_factory.mktemp("exact"),
    }


def _stores(setting: dict, features: FeatureConfig, name: str) -> tuple:
    root: Path = setting["root"] / name
    kwargs = {"model_id": "linear", "progress": False, "batch_size": 16, "chunk_size": 32}
    scheduler = default_scheduler_config()
    train = featurize(
        setting["model"], scheduler, setting["train"], features, root / "train", **kwargs
    )
    query = featurize(
        setting["model"], scheduler, setting["query"], features, root / "query", **kwargs
    )
    return train, query


def _das(setting: dict, config: DASConfig, projection: ProjectionConfig, name: str) -> np.ndarray:
    method = DAS(config)
    base = FeatureConfig(plan=PLAN, projection=projection, normalize=False, dtype="float64")
    train, query = _stores(setting, method.features(base), name)
    return method.fit(train).score(query).values.astype(np.float64)


IDENTITY = ProjectionConfig(kind="identity")


def test_das_equals_exact_leave_one_out_change(setting: dict) -> None:
    # r = D orthonormal directions carry the full output Jacobian; no projection, no damping.
    config = DASConfig(output="output_projection", num_directions=PIXELS, damping=0.0)
    scores = _das(setting, config, IDENTITY, "full")
    exact = (setting["change"] ** 2).sum(axis=2)
    # Scores are stored as float32, so the agreement is to float32 precision.
    np.testing.assert_allclose(scores, exact, rtol=1e-6, atol=1e-9 * exact.max())


def test_das_without_leverage_is_not_exact(setting: dict) -> None:
    config = DASConfig(
        output="output_projection", num_directions=PIXELS, damping=0.0, leverage=False
    )
    scores = _das(setting, config, IDENTITY, "no-leverage")
    exact = (setting["change"] ** 2).sum(axis=2)
    relative = np.abs(scores - exact).max() / exact.max()
    assert relative > 1e-3  # the correction matters...
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.9  # ...but the ranking is close


def test_das_linear_form_is_the_signed_change(setting: dict) -> None:
    # r = 1 along the first orthonormal direction: the linear form is u . (pred - pred_without).
    # One direction sees only part of the parameters (the kernel is singular): damp it.
    config = DASConfig(
        output="output_projection",
        num_directions=1,
        damping=1e-6,
        transform="linear",
        residual="signed",  # the exact form; the default (rms) is its expectation over noise
    )
    method = DAS(config)
    base = FeatureConfig(plan=PLAN, projection=IDENTITY, normalize=False, dtype="float64")
    features = method.features(base)
    train, query = _stores(setting, features, "linear")
    scores = method.fit(train).score(query).values.astype(np.float64)
    from diffattr.features._outputs import output_directions

    direction = output_directions(1, PIXELS, features.output.seed, dtype=torch.float64)[0].numpy()
    # One compressed output is not the model's full objective, so the match is approximate;
    # the signed change must still track the projected exact change closely.
    exact = setting["change"] @ direction
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.5


def test_das_with_projection_keeps_the_ranking(setting: dict) -> None:
    config = DASConfig(output="output_projection", num_directions=PIXELS, damping=1e-6)
    projection = ProjectionConfig(kind="dense", dim=24, seed=0)
    scores = _das(setting, config, projection, "projected")
    exact = (setting["change"] ** 2).sum(axis=2)
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.8


def test_das_mean_compression_tracks_the_exact_change(setting: dict) -> None:
    scores = _das(setting, DASConfig(damping=1e-6, residual="signed"), IDENTITY, "mean")
    exact = (setting["change"] ** 2).sum(axis=2)
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.3


def test_trak_predicts_the_exact_loss_change(setting: dict) -> None:
    method = TRAK(TRAKConfig(damping=1e-6))
    base = FeatureConfig(plan=PLAN, projection=IDENTITY, normalize=False, dtype="float64")
    train, query = _stores(setting, method.features(base), "trak")
    scores = method.fit(train).score(query).values
    exact = setting["loss_change"]  # positive: removing z_i raised the query's loss
    rho = np.mean([scipy.stats.spearmanr(s, e)[0] for s, e in zip(scores, exact, strict=True)])
    assert rho > 0.5
