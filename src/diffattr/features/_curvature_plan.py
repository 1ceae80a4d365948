"""What the curvature stage will need: memory, disk and time, from its layout and a short probe.

The stage (:func:`~diffattr.features.estimate_curvature`) holds, per covered layer with d_in
input columns (the bias's included) and d_out outputs, all float64:

    A (d_in^2), S (d_out^2), their eigenvalues (d_in + d_out) and eigenvectors
    (d_in^2 + d_out^2), and EK-FAC's corrected eigenvalues Lambda (d_out d_in);

plus the diagonal of the parameters outside the layers (the rest). Those are exactly the arrays
of ``curvature.safetensors``, so its size is known before anything runs. Its memory is the
largest of its phases (the factor pass, the eigen-decompositions, the EK-FAC pass); its time is
the two passes, each timed on one batch at one timestep as :func:`estimate_featurization` times
the features, plus the eigen-decompositions, timed on the layer sizes (above ``_EIGH_PROBE``
from one probe matrix of that size, scaled as d^3).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffattr._probe import measure
from diffattr.errors import ConfigError
from diffattr.features._curvature import (
    Curvature,
    CurvatureConfig,
    CurvatureProjector,
    LayerCurvature,
    _StageComputer,
)
from diffattr.features._engine import FeatureConfig
from diffattr.features._kronecker import LayerBlock

__all__ = ["CurvaturePlanEstimate", "curvature_layer_bytes", "estimate_curvature_cost"]

_F64 = 8
#: Largest eigen-decomposition timed directly; larger ones are scaled from this size as d^3.
_EIGH_PROBE = 1024


def curvature_layer_bytes(d_out: int, d_in: int) -> dict[str, int]:
    """Bytes of one layer's saved arrays (float64), by name as in ``curvature.safetensors``."""
    return {
        "a": d_in * d_in * _F64,
        "s": d_out * d_out * _F64,
        "a_eigenvalues": d_in * _F64,
        "a_basis": d_in * d_in * _F64,
        "s_eigenvalues": d_out * _F64,
        "s_basis": d_out * d_out * _F64,
        "ekfac": d_out * d_in * _F64,
    }


@dataclass(frozen=True)
class CurvaturePlanEstimate:
    """What the curvature stage will need: bytes by phase, seconds by part, and the layers.

    Attributes:
        parameters: p, the selected parameters.
        n_images: Training images of the stage.
        timesteps: K, plan steps per image.
        directions: Output directions per image and step (``samples``, or D for the exact
            Fisher): the backward passes are batched over them.
        batch_size: Images per batch.
        device: Where it runs.
        memory_bytes: Resident bytes in each phase (``factor_pass``, ``decomposition``,
            ``eigen_pass``, ``save``); the peak is the largest. A pass's working memory (activations
            included) is the probe's measured growth (:mod:`diffattr._probe`: CUDA, or the
            resident set on Linux), where larger than the sums it keeps.
        disk_bytes: ``curvature.safetensors``'s arrays (exact; the file adds a small header).
            The intermediate factors file, deleted at the end, is that minus Lambda and the rest.
        seconds: ``factors`` (first pass), ``eigendecompositions``, ``eigenvalues`` (EK-FAC
            pass).
        probe: What the seconds are derived from.
        layers: Per layer: module, d_out, d_in and its saved bytes.
        rest: Parameters outside the layers (their diagonal is kept).
    """

    parameters: int
    n_images: int
    timesteps: int
    directions: int
    batch_size: int
    device: str
    memory_bytes: dict[str, int]
    disk_bytes: int
    seconds: dict[str, float]
    probe: dict[str, float]
    layers: list[dict[str, Any]] = field(default_factory=list)
    rest: int = 0

    @property
    def peak_memory_bytes(self) -> int:
        """The largest phase."""
        return max(self.memory_bytes.values())

    @property
    def total_seconds(self) -> float:
        """Both passes and the eigen-decompositions."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            **asdict(self),
            "peak_memory_bytes": self.peak_memory_bytes,
            "total_seconds": self.total_seconds,
        }


def estimate_curvature_cost(
    model: nn.Module,
    scheduler_config: dict[str, Any],
    features: FeatureConfig | None = None,
    config: CurvatureConfig | None = None,
    *,
    image_shape: tuple[int, int, int],
    n_images: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    repeats: int = 2,
    probe: bool = True,
) -> CurvaturePlanEstimate:
    """Estimate the cost of the curvature stage of ``model`` on ``n_images`` training images.

    Args:
        model: The model (copied by the stage's computer, not changed).
        scheduler_config: Its noise schedule.
        features: The plan (K), the parameters and the precision (default ``FeatureConfig()``).
        config: The curvature's settings (default ``CurvatureConfig()``): the directions per
            step.
        image_shape: (C, H, W).
        n_images: Training images.
        batch_size: Images per batch (the probe's batch too).
        device: Where the probe runs, and the stage would.
        repeats: Timed repetitions of each probe (the fastest counts).
        probe: False: sizes only, no timing (``seconds`` and ``probe`` empty).

    Raises:
        ConfigError: Non-positive sizes, or parameters the factored backend cannot cover.
    """
    if n_images < 1:
        raise ConfigError(f"n_images={n_images} is invalid: must be >= 1")
    features = features or FeatureConfig()
    config = config or CurvatureConfig()
    device = torch.device(device)
    computer = _StageComputer(model, scheduler_config, features, config.sharing, device)
    layout = computer.layout
    blocks = list(layout.blocks)
    batch = max(1, min(batch_size, n_images))
    x0 = _probe_images(computer, batch, image_shape, device)
    output_size = int(np.prod(x0.shape[1:]))
    directions = output_size if config.fisher == "exact" else config.samples
    itemsize = torch.empty((), dtype=computer._work_dtype).element_size()

    saved = {b.module: sum(curvature_layer_bytes(b.d_out, b.d_in).values()) for b in blocks}
    factors = sum((b.d_in**2 + b.d_out**2) * _F64 for b in blocks)
    decomposed = sum((2 * b.d_in**2 + 2 * b.d_out**2 + b.d_in + b.d_out) * _F64 for b in blocks)
    lambdas = sum(b.d_out * b.d_in * _F64 for b in blocks)
    rest = layout.rest_numel * _F64 if layout.rest else 0
    saved_bytes = sum(saved.values()) + rest
    model_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max((b.d_out * b.d_in for b in blocks), default=0)

    seconds: dict[str, float] = {}
    measured: dict[str, float] = {}
    peaks: dict[str, int | None] = {}
    if probe:
        cond = computer.condition([""] * batch) if computer.conditional else None
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(device)
        along = torch.randn(
            (batch, directions, output_size), generator=torch.Generator().manual_seed(2)
        )

        def run() -> None:
            computer.sums = {}
            computer.accumulate(x0, 500, noise, cond, along)

        computer.stage = "factors"
        factor_probe = measure(run, repeats, device)
        per_batch, peaks["factor_pass"] = factor_probe.seconds, factor_probe.peak_bytes
        measured["seconds_per_factor_batch"] = per_batch
        computer.stage = "eigenvalues"
        computer.projector = CurvatureProjector(
            layout, _identity_curvature(blocks), kind=None, device=device
        )
        eigen_probe = measure(run, repeats, device)
        per_batch_eigen, peaks["eigen_pass"] = eigen_probe.seconds, eigen_probe.peak_bytes
        measured["seconds_per_eigen_batch"] = per_batch_eigen
        computer.sums = {}
        pairs = n_images * features.plan.num_steps / batch
        sizes = [b.d_in for b in blocks] + [b.d_out for b in blocks]
        seconds = {
            "factors": per_batch * pairs,
            "eigendecompositions": _eigh_seconds(sizes, measured),
            "eigenvalues": per_batch_eigen * pairs,
        }
    # What a pass allocates: the running sums (and, in the EK-FAC pass, one layer's rotated
    # batch gradient), or, where the probe measured it, its growth over the pass (the sums,
    # activations and temporaries), whichever is larger.
    factor_work = max(factors, peaks.get("factor_pass") or 0)
    eigen_work = max(lambdas + rest + batch * largest * itemsize, peaks.get("eigen_pass") or 0)
    memory = {
        "factor_pass": model_bytes + factor_work,
        # The summed factors, their means, eigenvalues and eigenvectors (rank 0).
        "decomposition": model_bytes + factors + decomposed,
        # The factors and bases read back, the bases in the working precision on the device,
        # and the pass's work.
        "eigen_pass": model_bytes
        + decomposed
        + sum((b.d_in**2 + b.d_out**2) for b in blocks) * itemsize
        + eigen_work,
        # The whole estimate and its serialised copy (safetensors writes from bytes).
        "save": model_bytes + decomposed + lambdas + rest + saved_bytes,
    }
    return CurvaturePlanEstimate(
        parameters=computer.num_parameters,
        n_images=n_images,
        timesteps=features.plan.num_steps,
        directions=directions,
        batch_size=batch,
        device=str(device),
        memory_bytes={k: int(v) for k, v in memory.items()},
        disk_bytes=int(saved_bytes),
        seconds=seconds,
        probe=measured,
        layers=[
            {"module": b.module, "d_out": b.d_out, "d_in": b.d_in, "bytes": saved[b.module]}
            for b in blocks
        ],
        rest=layout.rest_numel if layout.rest else 0,
    )


def _probe_images(
    computer: _StageComputer, batch: int, image_shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    """Random images as the model sees them (latents for a latent model); cost only."""
    images = torch.zeros((batch, *image_shape)).uniform_(
        -1, 1, generator=torch.Generator().manual_seed(0)
    )
    return computer.encode(images.to(device))


def _identity_curvature(blocks: list[LayerBlock]) -> Curvature:
    """A stand-in estimate with identity bases: the EK-FAC pass costs the same with any basis."""
    layers = {}
    for b in blocks:
        eye_in, eye_out = np.eye(b.d_in), np.eye(b.d_out)
        layers[b.module] = LayerCurvature(
            eye_in, eye_out, np.ones(b.d_in), eye_in, np.ones(b.d_out), eye_out
        )
    return Curvature(layers, None, n_images=1, output_size=1, settings={})


def _eigh_seconds(sizes: list[int], probe: dict[str, float]) -> float:
    """Seconds of the float64 eigen-decompositions of the given sizes (NumPy, as the stage)."""
    timed: dict[int, float] = {}
    total = 0.0
    for size in sizes:
        measured = min(size, _EIGH_PROBE)
        if measured not in timed:
            matrix = np.random.default_rng(0).standard_normal((measured, measured))
            matrix = matrix @ matrix.T
            began = time.perf_counter()
            np.linalg.eigh(matrix)
            timed[measured] = time.perf_counter() - began
        total += timed[measured] * (size / measured) ** 3
    probe["largest_factor_side"] = float(max(sizes, default=0))
    return total
