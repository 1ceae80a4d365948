"""Memory, disk and time of a featurisation, known before it starts, and the backend to use.

Memory and disk follow from the shapes. Time comes from a short probe on the target device:
one batch of per-sample gradients at one timestep, one block of the projection matrix and
one projection multiply, each timed after a warm-up, then scaled to the whole run by the same
arithmetic :func:`~diffattr.features.featurize` follows (the gradients are averaged over the
plan before they are projected, and a regenerated matrix is made once per buffer of rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffattr._probe import measure
from diffattr.errors import ConfigError
from diffattr.features._engine import FeatureConfig
from diffattr.features._factored import FactoredGradientComputer, refuse_batch_coupling
from diffattr.features._gradients import GradientComputer, select_parameters
from diffattr.features._hashing import dense_block
from diffattr.features._kronecker import KroneckerLayout
from diffattr.features._projection import ProjectionConfig

_MB = 1 << 20


@dataclass(frozen=True)
class BackendChoice:
    """The feature backend :func:`choose_backend` picks, and why."""

    backend: str
    reason: str


def choose_backend(model: torch.nn.Module, parameters: list[str] | None = None) -> BackendChoice:
    """The backend ``diffattr attribute`` uses by default: factored wherever it applies.

    The rule, from measurements on this repository's benchmarks (``benchmarks/README.md``):
    the factored backend (Kronecker factors to 64 k features, then sparse to k) gave the same
    LDS as vmap with a dense projection at the same k on the digits-mlp benchmark (DAS 0.804 vs
    0.802 held-out, 0.677 vs 0.670 generated) and featurised it about 8 times faster. At
    k = 4096 on a CPU it ran at 0.80 and 0.82 of a training step's throughput on unet-cifar
    (36M parameters) and a reduced Stable-Diffusion UNet, where vmap + sparse reached 0.44 and
    0.38 while holding 3.6-4.1 GB of per-sample gradients; on unet-tiny the two were level
    (0.63, 0.61) and vmap + dense reached 0.003. So the factored backend is the default for
    every model size it can serve; vmap (with a dense projection) remains for the parameters it
    cannot: anything outside Linear, Conv2d (not
    grouped), GroupNorm and LayerNorm, and models with batch-coupled layers (BatchNorm using
    batch statistics).

    Args:
        model: The model.
        parameters: Parameter globs (None: all).

    Raises:
        ConfigError: Bad parameter patterns.
    """
    names = select_parameters(model, parameters)
    try:
        refuse_batch_coupling(model)
        # Only coverage is checked here: a budget large enough for any model.
        KroneckerLayout(
            model, names, ProjectionConfig(kind="kronecker", dim=1, factored_dim=1 << 60)
        )
    except ConfigError as err:
        return BackendChoice("vmap", f"the factored backend does not apply: {err}")
    selected = set(names)
    p = sum(param.numel() for name, param in model.named_parameters() if name in selected)
    return BackendChoice(
        "factored",
        f"all {p:,} selected parameters are in Linear, Conv2d and normalisation layers: "
        "factored features need no per-sample gradients and matched vmap + dense on LDS",
    )


@dataclass(frozen=True)
class FeaturePlanEstimate:
    """What a featurisation will need; byte counts, seconds, and what they were derived from."""

    backend: str
    parameters: int
    outputs: int
    proj_dim: int
    timesteps: int
    n_samples: int
    batch_size: int
    device: str
    matrix_kept: bool
    memory_bytes: dict[str, int]
    disk_bytes: int
    seconds: dict[str, float]
    probe: dict[str, float]
    layout: list[str] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> int:
        """The sum of the resident pieces (an upper bound: not all live at once)."""
        return sum(self.memory_bytes.values())

    @property
    def total_seconds(self) -> float:
        """Expected featurisation and kernel time."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            **asdict(self),
            "peak_memory_bytes": self.peak_memory_bytes,
            "total_seconds": self.total_seconds,
        }


def estimate_featurization(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    features: FeatureConfig | None = None,
    *,
    image_shape: tuple[int, int, int],
    n_samples: int,
    batch_size: int = 32,
    projection_buffer_mb: int = 1024,
    device: str | torch.device = "cpu",
    repeats: int = 2,
) -> FeaturePlanEstimate:
    """Estimate the cost of featurising ``n_samples`` images, from a short measured probe.

    The settings are those :func:`~diffattr.features.featurize` would get, so a plan and the run
    it describes cannot disagree: ``backend="auto"`` is resolved for ``model`` by the same rule.

    Args:
        model: The model (it is copied by the gradient computer, not changed).
        scheduler_config: Its noise schedule.
        features: The feature settings (default: ``FeatureConfig()``): the plan's K, k, the
            output function, the parameters, the backend, the projection's memory budget and
            the stored precision come from it.
        image_shape: (C, H, W).
        n_samples: Training plus query images to featurise.
        batch_size: Images per gradient batch (the probe's batch too).
        projection_buffer_mb: Plan-averaged gradients buffered per projection.
        device: Where the probe runs, and the run would.
        repeats: Timed repetitions of each probe (the fastest counts).

    The factored backend's probe times
    :meth:`~diffattr.features.FactoredGradientComputer.compute_features`, projection included,
    and its estimate carries the per-layer layout.

    Raises:
        ConfigError: Non-positive sizes.
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} is invalid: must be >= 1")
    device = torch.device(device)
    features = (features or FeatureConfig()).resolve(model)
    parameters = None if features.parameters is None else list(features.parameters)
    timesteps, proj_dim = features.plan.num_steps, features.projection.dim
    disk = _disk_bytes(n_samples, timesteps, features)
    if features.backend == "factored":
        return _estimate_factored(
            model,
            scheduler_config,
            image_shape=image_shape,
            n_samples=n_samples,
            features=features,
            disk_bytes=disk,
            batch_size=batch_size,
            device=device,
            repeats=repeats,
        )
    output = features.output
    dtype = torch.float64 if features.dtype == "float64" else torch.float32
    max_memory_mb = features.projection.max_memory_mb
    computer = GradientComputer(
        model, scheduler_config, output, parameters, dtype=dtype, device=device
    )
    p, r = computer.num_parameters, computer.num_outputs
    batch = max(1, min(batch_size, n_samples))
    x0, noise, cond = _probe_inputs(computer, batch, image_shape, device)
    measured = measure(lambda: computer.compute(x0, 500, noise, cond), repeats, device)
    grad_seconds = measured.seconds

    itemsize = 8 if dtype == torch.float64 else 4
    matrix_bytes = p * proj_dim * itemsize
    kept = matrix_bytes <= max_memory_mb * _MB
    rows = max(1, min(p, (64 * _MB) // (itemsize * proj_dim)))
    distribution = features.projection.distribution
    gen_seconds = measure(
        lambda: dense_block(0, range(rows), proj_dim, distribution, device=device), repeats, device
    ).seconds
    block = dense_block(0, range(rows), proj_dim, distribution, device=device)
    grads = torch.randn((batch * r, rows), device=device)
    mm_seconds = measure(lambda: grads @ block, repeats, device).seconds

    pairs = n_samples * timesteps
    buffer_rows = max(batch, (projection_buffer_mb * _MB) // (r * p * itemsize))
    regenerations = 1 if kept else -(-n_samples // buffer_rows)
    seconds = {
        "gradients": grad_seconds / batch * pairs,
        "projection_generation": gen_seconds * (p / rows) * regenerations,
        "projection_multiply": mm_seconds * (p / rows) * (n_samples / batch),
        "kernel": _kernel_seconds(n_samples, r, proj_dim),
    }
    per_sample = r * p * itemsize
    memory = {
        "model_and_copy": 2 * p * itemsize,
        # Measured: the probe batch's per-sample gradients, activations and temporaries.
        "per_sample_gradients": _or(measured.peak_bytes, 3 * batch * per_sample),
        "gradient_buffer": min(buffer_rows, n_samples) * per_sample,
        "projection_matrix": matrix_bytes if kept else rows * proj_dim * itemsize,
        "kernel": 2 * proj_dim**2 * 8,  # Phi^T Phi and its Cholesky factor, float64
    }
    return FeaturePlanEstimate(
        backend="vmap",
        parameters=p,
        outputs=r,
        proj_dim=proj_dim,
        timesteps=timesteps,
        n_samples=n_samples,
        batch_size=batch,
        device=str(device),
        matrix_kept=kept,
        memory_bytes={k: int(v) for k, v in memory.items()},
        disk_bytes=disk,
        seconds=seconds,
        probe={
            "seconds_per_gradient_pair": grad_seconds / batch,
            "seconds_per_matrix_element": gen_seconds / (rows * proj_dim),
            "matmul_gflops": 2 * batch * r * rows * proj_dim / mm_seconds / 1e9,
        },
    )


def _estimate_factored(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    *,
    image_shape: tuple[int, int, int],
    n_samples: int,
    features: FeatureConfig,
    disk_bytes: int,
    batch_size: int,
    device: torch.device,
    repeats: int,
) -> FeaturePlanEstimate:
    projection, timesteps = features.projection, features.plan.num_steps
    parameters = None if features.parameters is None else list(features.parameters)
    computer = FactoredGradientComputer(
        model, scheduler_config, features.output, projection, parameters, device=device
    )
    layout = computer.layout
    p, r, k = computer.num_parameters, computer.num_outputs, computer.proj_dim
    batch = max(1, min(batch_size, n_samples))
    x0, noise, cond = _probe_inputs(computer, batch, image_shape, device)
    measured = measure(lambda: computer.compute_features(x0, 500, noise, cond), repeats, device)
    seconds_per_batch = measured.seconds
    largest = max((block.d_out * block.d_in for block in layout.blocks), default=0)
    memory = {
        "model_and_copy": 2 * p * 4,
        # Measured (activations included); without a measurement: the block accumulators and
        # their concatenation, and one layer's exact gradient (activations not counted).
        "factored_features": _or(
            measured.peak_bytes, batch * r * (2 * layout.factored_dim + largest) * 4
        ),
        "final_sparse_map": (
            layout.factored_dim * projection.nnz * 12 if layout.factored_dim > k else 0
        ),
        "kernel": 2 * k**2 * 8,
    }
    return FeaturePlanEstimate(
        backend="factored",
        parameters=p,
        outputs=r,
        proj_dim=k,
        timesteps=timesteps,
        n_samples=n_samples,
        batch_size=batch,
        device=str(device),
        matrix_kept=True,
        memory_bytes={key: int(value) for key, value in memory.items()},
        disk_bytes=disk_bytes,
        seconds={
            "gradients": seconds_per_batch / batch * n_samples * timesteps,
            "kernel": _kernel_seconds(n_samples, r, k),
        },
        probe={"seconds_per_gradient_pair": seconds_per_batch / batch},
        layout=layout.describe(),
    )


def _probe_inputs(
    computer: GradientComputer,
    batch: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random images as the model sees them (latents for a latent model), and noise.

    A conditional model also gets the empty prompt's conditioning: the cost does not depend on
    the prompt.
    """
    images = torch.zeros((batch, *image_shape)).uniform_(
        -1, 1, generator=torch.Generator().manual_seed(0)
    )
    x0 = computer.encode(images.to(device))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    cond = computer.condition([""] * batch) if computer.conditional else None
    return x0, noise.to(device), cond


def _disk_bytes(n_samples: int, timesteps: int, features: FeatureConfig) -> int:
    # Stored per sample (as featurize lays out a store): features (r k) in the storage dtype;
    # losses and norms (2 K) and residuals (K r) in the computation's.
    r, k = features.output.num_outputs, features.projection.dim
    compute = 8 if features.dtype == "float64" else 4
    stored = 2 if features.storage == "float16" else compute
    return n_samples * (r * k * stored + (2 * timesteps + timesteps * r) * compute)


def _kernel_seconds(n: int, r: int, k: int) -> float:
    # Phi^T Phi in float64: 2 n r k^2 flops at a conservative 20 GFLOP/s, plus the Cholesky.
    return (2 * n * r * k * k + k**3 / 3) / 20e9


def _or(measured: int | None, fallback: int) -> int:
    """The probe's measurement where it has one (CUDA, Linux), else the shape-based bound."""
    return fallback if measured is None else measured
