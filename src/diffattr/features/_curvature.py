"""The curvature stage: K-FAC and EK-FAC estimates of the Gauss-Newton matrix of the diffusion loss.

docs/methods.md, "K-FAC / EK-FAC influence". The training objective is the mean of the loss
l = ||eps_hat - y||^2 / D over the training images and the plan's (timestep, noise) pairs. Its
Gauss-Newton matrix is

    G = E_{i,t} [ J^T (2/D) J ],    J = d eps_hat / d theta (D x p),

(2/D) I being the loss's Hessian in the output. A pseudo-gradient J^T u with u ~ N(0, (2/D) I)
has E_u[(J^T u)(J^T u)^T] = J^T (2/D) J: ``fisher="sampled"`` draws ``samples`` such u per image
and plan step from the recorded seed (the true Fisher of the model's Gaussian, which for the
squared error is the GGN); ``fisher="exact"`` takes the D directions sqrt(2/D) e_j, which sum to
it exactly (D backward passes per step). u does not depend on the target, so neither does G.

For a covered layer (Linear or Conv2d, the bias as an input column of ones) the factored
backend's hooks give the inputs a_p and the pseudo-gradients d_p at every position p. The layer's
per-sample gradient is sum_p d_p a_p^T, and its block of G (the weight flattened row-major, as the
features are) is approximated by S (x) A with

    expand (default):  A = E[sum_p a_p a_p^T] / P,       S = E[sum_p d_p d_p^T]
    reduce:            A = E[abar abar^T], abar = mean_p a_p,  S = E[dbar dbar^T], dbar = sum_p d_p

(Eschenhagen et al. 2023). Expand treats positions as independent examples, which is exact for a
linear layer when every position has its own loss term; the diffusion loss has one per output
pixel and convolutions and attention keep positions apart up to the output, so expand is the
default (as in Mlodozeniec et al. 2025 for diffusion models); P = 1 (every MLP layer) makes the
two equal. EK-FAC keeps the eigenvectors, A = Q_A diag(a) Q_A^T and S = Q_S diag(s) Q_S^T, and
replaces the eigenvalues s_j a_m by the second moments of the rotated pseudo-gradients,

    Lambda = E[(Q_S^T G Q_A)^2]   (elementwise),

which the factored hooks compute with P_out = Q_S and P_in = Q_A (a second pass over the data).
Selected parameters outside such layers (normalisation scales and shifts, lone biases) get the
diagonal E[g^2], in K-FAC and EK-FAC alike.

The stage is saved in a directory as ``curvature.safetensors`` (float64) and ``curvature.json``
(settings, progress, SHA-256); it resumes chunk by chunk and refuses a directory made with other
settings. Under ``torch.distributed`` each rank sums its block of the images and the sums are
all-reduced, as the kernel's are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffattr._config import check_fields, is_int, known_fields
from diffattr._io import atomic_write, read_json, sha256_file, write_json
from diffattr._seed import generator
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreCorruptError, StoreMismatchError
from diffattr.features._distributed import Distributed, part_name
from diffattr.features._engine import _DTYPES, FeatureConfig
from diffattr.features._factored import FactoredGradientComputer, _Capture
from diffattr.features._gradients import select_parameters
from diffattr.features._kronecker import KroneckerLayout, KroneckerProjector, LayerBlock
from diffattr.features._outputs import OutputConfig
from diffattr.features._plan import Plan
from diffattr.features._projection import ProjectionConfig

__all__ = [
    "Curvature",
    "CurvatureConfig",
    "CurvatureProjector",
    "LayerCurvature",
    "estimate_curvature",
    "full_projection",
]

Fisher = Literal["sampled", "exact"]
Sharing = Literal["expand", "reduce"]
Kind = Literal["kfac", "ekfac"]

FORMAT = "diffattr.curvature"
FORMAT_VERSION = 1
SETTINGS_FILE = "curvature.json"
CURVATURE_FILE = "curvature.safetensors"
_FACTORS_FILE = "factors.safetensors"


@dataclass(frozen=True, kw_only=True, slots=True)
class CurvatureConfig:
    """How the Gauss-Newton matrix is estimated (the plan and parameters come with the features)."""

    fisher: Fisher = field(
        default="sampled",
        metadata={
            "help": "sampled: output directions u ~ N(0, 2/D I) per image and step (the GGN "
            "sampled from the model's Gaussian); exact: all D directions (D backward passes)"
        },
    )
    samples: int = field(
        default=1, metadata={"help": "sampled: directions per image and plan step"}
    )
    sharing: Sharing = field(
        default="expand",
        metadata={
            "help": "weight sharing over positions (convolutions, attention): expand (positions "
            "as examples) or reduce (positions summed first)"
        },
    )
    seed: int = field(default=0, metadata={"help": "root seed of the sampled directions"})

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "fisher": self.fisher in get_args(Fisher),
                "samples": is_int(self.samples) and self.samples >= 1,
                "sharing": self.sharing in get_args(Sharing),
                "seed": is_int(self.seed),
            },
            {
                "fisher": "sampled or exact",
                "samples": "an int >= 1",
                "sharing": "expand or reduce",
                "seed": "an int",
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON types (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvatureConfig:
        """Rebuild settings written by :meth:`to_dict`; unknown keys are an error."""
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, slots=True)
class LayerCurvature:
    """One layer's factors, their eigen-decompositions and the corrected eigenvalues (float64).

    Attributes:
        a: A, (d_in, d_in), the input factor (last row and column: the bias's ones).
        s: S, (d_out, d_out), the output-gradient factor.
        a_eigenvalues: Eigenvalues of A, decreasing (negative rounding clipped to 0).
        a_basis: Q_A, (d_in, d_in), the matching eigenvectors as columns.
        s_eigenvalues: Eigenvalues of S, decreasing.
        s_basis: Q_S, (d_out, d_out).
        ekfac: Lambda, (d_out, d_in), E[(Q_S^T G Q_A)^2]; None until the second pass.
    """

    a: np.ndarray
    s: np.ndarray
    a_eigenvalues: np.ndarray
    a_basis: np.ndarray
    s_eigenvalues: np.ndarray
    s_basis: np.ndarray
    ekfac: np.ndarray | None = None

    def eigenvalues(self, kind: Kind) -> np.ndarray:
        """The (d_out, d_in) eigenvalues of the layer's block in the basis Q_S (x) Q_A."""
        if kind == "kfac":
            return np.outer(self.s_eigenvalues, self.a_eigenvalues)
        if self.ekfac is None:
            raise ValueError("the EK-FAC eigenvalues are not estimated yet")
        return self.ekfac


class Curvature:
    """A K-FAC / EK-FAC estimate of G.

    One :class:`LayerCurvature` per covered layer, plus the diagonal of the other selected
    parameters. Build it with :func:`estimate_curvature`.

    Attributes:
        layers: Module name -> its curvature, in the layout's order.
        rest: E[g^2] of the parameters outside the layers (in the layout's rest order); None
            until the second pass.
        n_images: Training images averaged over.
        output_size: D, the values per sample of the model's prediction.
        settings: What the estimate was made from (JSON types).
        sha256: SHA-256 of the saved ``curvature.safetensors`` (None before it is saved).
    """

    def __init__(
        self,
        layers: dict[str, LayerCurvature],
        rest: np.ndarray | None,
        *,
        n_images: int,
        output_size: int,
        settings: dict[str, Any],
        sha256: str | None = None,
    ) -> None:
        self.layers = layers
        self.rest = rest
        self.n_images = n_images
        self.output_size = output_size
        self.settings = settings
        self.sha256 = sha256

    @property
    def num_parameters(self) -> int:
        """p: the layers' weights and biases plus the rest."""
        rest = 0 if self.rest is None else self.rest.size
        return sum(layer.s.shape[0] * layer.a.shape[0] for layer in self.layers.values()) + rest

    def mean_eigenvalue(self, kind: Kind) -> float:
        """trace(G) / p of the K-FAC or EK-FAC estimate: the scale of the damping rule."""
        total = sum(float(layer.eigenvalues(kind).sum()) for layer in self.layers.values())
        if self.rest is not None:
            total += float(self.rest.sum())
        return total / self.num_parameters

    def identity(self) -> dict[str, Any]:
        """What identifies the estimate in the settings of features made with it."""
        return {"sha256": self.sha256, "settings": self.settings}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays saved in ``curvature.safetensors``, keyed by layer index."""
        arrays: dict[str, np.ndarray] = {}
        for index, layer in enumerate(self.layers.values()):
            for name, value in _layer_arrays(layer).items():
                arrays[f"layers.{index}.{name}"] = value
        if self.rest is not None:
            arrays["rest"] = self.rest
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], modules: list[str], **info: Any
    ) -> Curvature:
        """Rebuild an estimate from :meth:`to_arrays` and the modules in layout order."""
        layers = {}
        for index, module in enumerate(modules):
            prefix = f"layers.{index}."
            values = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            layers[module] = LayerCurvature(**values)
        return cls(layers, arrays.get("rest"), **info)


def _layer_arrays(layer: LayerCurvature) -> dict[str, np.ndarray]:
    fields = {name: getattr(layer, name) for name in LayerCurvature.__slots__}
    return {name: np.ascontiguousarray(v) for name, v in fields.items() if v is not None}


def full_projection(
    model: nn.Module, parameters: tuple[str, ...] | None, seed: int = 0
) -> ProjectionConfig:
    """A kronecker projection that keeps every selected parameter: k = p, no second stage.

    Its layout has each layer's whole (d_out, d_in) block and the rest unprojected, the layout of
    the curvature and of the exact route.
    """
    params = dict(model.named_parameters())
    p = sum(params[name].numel() for name in select_parameters(model, parameters))
    return ProjectionConfig(kind="kronecker", dim=p, factored_dim=p, seed=seed)


def compute_dtype(features: FeatureConfig) -> torch.dtype:
    """The dtype the model runs in for ``features``: bfloat16 under bf16 mixed precision."""
    return torch.bfloat16 if features.mixed_precision == "bf16" else _DTYPES[features.dtype]


class CurvatureProjector(KroneckerProjector):
    """The Kronecker projection onto a curvature's eigenvectors, optionally preconditioned.

    Layer l keeps (Q_S[:, :k_out])^T G (Q_A[:, :k_in]), the eigenvectors of the k_out largest
    eigenvalues of S and the k_in largest of A (all of them in a full layout). Preconditioned,
    coordinate (j, m) is further multiplied by ``scale / sqrt(Lambda_jm + lambda)`` and the rest
    by ``scale / sqrt(diag + lambda)``, so that inner products of features are
    scale^2 g_x^T (G + lambda I)^-1 g_z within the kept eigen-directions; a final sparse stage,
    when the layout has one, then applies as usual.

    Args:
        layout: Which layers and how many eigenvectors of each side (k_out, k_in).
        curvature: The estimate; its layers must be the layout's.
        kind: Whose eigenvalues precondition: ``"kfac"`` (s_j a_m) or ``"ekfac"``; None: rotate
            only (the EK-FAC pass).
        damping: lambda as a multiple of the estimate's mean eigenvalue (the kernel's rule).
        scale: A factor on every feature.
        device: Where the factors are made.

    Raises:
        StoreMismatchError: The curvature covers other layers than the layout.
    """

    def __init__(
        self,
        layout: KroneckerLayout,
        curvature: Curvature,
        *,
        kind: Kind | None,
        damping: float = 0.0,
        scale: float = 1.0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(layout, device)
        shapes = {b.module: (b.d_out, b.d_in) for b in layout.blocks}
        held = {m: (c.s.shape[0], c.a.shape[0]) for m, c in curvature.layers.items()}
        if shapes != held:
            raise StoreMismatchError(
                "the curvature was estimated for other layers than the features select: "
                f"{sorted(set(held.items()) ^ set(shapes.items()))[:4]}"
            )
        self.curvature = curvature
        self.kind = kind
        self.damping = float(damping)
        self.mean_eigenvalue = 0.0 if kind is None else curvature.mean_eigenvalue(kind)
        self.lam = self.damping * self.mean_eigenvalue
        self.scale = float(scale)
        self._block_scale: Tensor | None = None
        self._rest_scale: Tensor | None = None
        if kind is not None:
            parts = []
            for block in layout.blocks:
                values = curvature.layers[block.module].eigenvalues(kind)
                parts.append(values[: block.k_out, : block.k_in].reshape(-1))
            self._block_scale = self._inverse_root(np.concatenate(parts))
            if layout.rest:
                assert curvature.rest is not None
                self._rest_scale = self._inverse_root(curvature.rest)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`KroneckerProjector.to_dict`; adds the curvature and the preconditioning."""
        return super().to_dict() | {
            "curvature": self.curvature.identity(),
            "preconditioner": {
                "kind": self.kind,
                "damping": self.damping,
                "mean_eigenvalue": self.mean_eigenvalue,
                "lambda": self.lam,
                "scale": self.scale,
            },
        }

    def _inverse_root(self, eigenvalues: np.ndarray) -> Tensor:
        damped = eigenvalues + self.lam
        if (damped <= 0).any():
            raise ConfigError(
                f"the {self.kind} curvature has zero eigenvalues and lambda={self.lam:g}: use "
                "damping > 0"
            )
        return self.scale / torch.from_numpy(np.sqrt(damped))

    def factors(
        self, block: LayerBlock, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``(Q_S[:, :k_out], Q_A[:, :k_in])`` of ``block``, made once per dtype and device."""
        key = (block.module, dtype, str(device))
        if key not in self._factors:
            layer = self.curvature.layers[block.module]
            self._factors[key] = (
                torch.from_numpy(layer.s_basis[:, : block.k_out]).to(device, dtype),
                torch.from_numpy(layer.a_basis[:, : block.k_in]).to(device, dtype),
            )
        return self._factors[key]

    def whole_sides(self, block: LayerBlock) -> tuple[bool, bool]:
        """Never: an eigenbasis is not the identity even when it is complete."""
        return False, False

    def project_rest(self, rest: Tensor) -> Tensor:
        """Precondition the rest vector (B, rest numel), then project it as usual."""
        if self._rest_scale is not None:
            rest = rest * self._rest_scale.to(rest.device, rest.dtype)
        return super().project_rest(rest)

    def project_final(self, factored: Tensor) -> Tensor:
        """Precondition the layer blocks of (B, factored_dim) features, then the final stage."""
        if self._block_scale is not None:
            used = len(self._block_scale)
            scale = self._block_scale.to(factored.device, factored.dtype)
            factored = torch.cat([factored[:, :used] * scale, factored[:, used:]], dim=1)
        return super().project_final(factored)


class _StageComputer(FactoredGradientComputer):
    """The factored backend driven by output directions, summing factors or eigenvalues.

    The backward pass differentiates sum_b u_b . eps_hat_b (r directions per sample), so the hooks
    see pseudo-gradients J^T u; the captures below add up what each pass needs in ``sums``.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict[str, Any],
        features: FeatureConfig,
        sharing: Sharing,
        device: str | torch.device,
    ) -> None:
        super().__init__(
            model,
            scheduler_config,
            OutputConfig(kind="loss"),
            full_projection(model, features.parameters, features.projection.seed),
            features.parameters,
            dtype=compute_dtype(features),
            device=device,
        )
        self.sharing = sharing
        self.index = {block.module: i for i, block in enumerate(self.layout.blocks)}
        self.stage = "factors"
        self.sums: dict[str, Tensor] = {}
        self._directions: Tensor | None = None

    def accumulate(
        self, x0: Tensor, timestep: int, noise: Tensor, cond: Tensor | None, directions: Tensor
    ) -> None:
        """Add one batch's contributions at one plan step; ``directions`` is (B, r, D)."""
        self._directions = directions.to(self.device, self._work_dtype)
        self.num_outputs = directions.shape[1]
        try:
            self.compute_features(x0, timestep, noise, cond)
        finally:
            self._directions = None
            self.num_outputs = self._output.num_outputs

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the float64 sum ``name``."""
        value = value.detach().to(torch.float64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def _capture(self, batch: int) -> _Capture:
        return (
            _FactorCapture(self, batch) if self.stage == "factors" else _EigenCapture(self, batch)
        )

    def _batched_output(self, sample_shape: tuple[int, ...]) -> Callable[..., Tensor]:
        directions = self._directions
        assert directions is not None

        def along_directions(prediction: Tensor, target: Tensor) -> Tensor:
            along = directions.to(prediction.dtype)
            return torch.einsum("brd,bd->br", along, prediction.flatten(1))

        return along_directions


class _FactorCapture(_Capture):
    """First pass: A and S of every layer, from the hooks' inputs and output gradients."""

    computer: _StageComputer

    def on_layer_grad(self, block: LayerBlock, module: nn.Module, grad: Tensor) -> None:
        index, expand = self.computer.index[block.module], self.computer.sharing == "expand"
        delta = self.delta(block, grad)  # (B, d_out, P)
        positions = delta.shape[2]
        if self.row == 0:  # the inputs are the same for every direction
            a = self.inputs(block, module)  # (B, d_in without the bias, P)
            if block.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            if expand:
                flat = a.transpose(0, 1).reshape(block.d_in, -1)
                self.computer.add(f"{index}.a", flat @ flat.T / positions)
            else:
                mean = a.mean(dim=2)
                self.computer.add(f"{index}.a", mean.T @ mean)
        if expand:
            flat = delta.transpose(0, 1).reshape(block.d_out, -1)
            self.computer.add(f"{index}.s", flat @ flat.T)
        else:
            total = delta.sum(dim=2)
            self.computer.add(f"{index}.s", total.T @ total)

    def finish(self) -> tuple[Tensor, Tensor]:
        return torch.empty((self.batch, self.computer.num_outputs, 0)), self.square_norms


class _EigenCapture(_Capture):
    """Second pass: squares of the gradients rotated into the eigenbasis, summed."""

    computer: _StageComputer

    def _target(self, block: LayerBlock) -> Tensor:
        # One layer and one direction at a time, never B x r x p values.
        self._rotated = torch.zeros((self.batch, block.k_out, block.k_in), **self._like)
        return self._rotated

    def on_layer_grad(self, block: LayerBlock, module: nn.Module, grad: Tensor) -> None:
        super().on_layer_grad(block, module, grad)
        index = self.computer.index[block.module]
        self.computer.add(f"{index}.ekfac", self._rotated.square().sum(dim=0))

    def finish(self) -> tuple[Tensor, Tensor]:
        if self.rest:
            rest = torch.cat(self.rest, dim=2)
            self.computer.add("rest", rest.square().sum(dim=(0, 1)))
        return torch.empty((self.batch, self.computer.num_outputs, 0)), self.square_norms


def estimate_curvature(
    model: nn.Module,
    scheduler_config: dict[str, Any],
    dataset: ImageDataset,
    features: FeatureConfig,
    config: CurvatureConfig,
    path: str | os.PathLike[str],
    *,
    model_id: str,
    batch_size: int = 32,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    distributed: Distributed | None = None,
) -> Curvature:
    """Estimate (or resume estimating, or load) the K-FAC and EK-FAC curvature of ``model``.

    Two passes over ``dataset`` at every step of the plan of ``features``: the factors A and S,
    then (in their eigenbases) the EK-FAC eigenvalues and the rest's diagonal. Collective under
    ``torch.distributed``: every rank calls it alike and sums its block of the images.

    Args:
        model: The model (copied, never changed).
        scheduler_config: Its noise schedule.
        dataset: The training images.
        features: The plan, the selected parameters and the precision (its output function and
            projection play no part).
        config: The Fisher sampling, the weight-sharing rule and the seed.
        path: The directory of the estimate: resumed when it holds a partial one with the same
            settings, loaded when complete.
        model_id: Identifies the weights (as for feature stores).
        batch_size: Images per batch (memory only).
        chunk_size: Images per saved partial sum: the unit of resumption.
        device: Where to compute.
        progress: Show progress bars.
        distributed: The job (default: the current process group, if any).

    Returns:
        The estimate, also saved under ``path``.

    Raises:
        StoreMismatchError: ``path`` holds an estimate made with other settings.
        StoreCorruptError: A saved file differs from its recorded SHA-256.
        ConfigError: Parameters outside Linear, Conv2d and normalisation layers, or batch-coupled
            layers (as for the factored backend).
    """
    distributed = distributed or Distributed.current()
    path = Path(path)
    computer = _StageComputer(model, scheduler_config, features, config.sharing, device)
    computer.condition(None if dataset.prompts is None else list(dataset.prompts[:1]))
    plan = Plan.build(features.plan, computer.num_train_timesteps)
    modules = [block.module for block in computer.layout.blocks]
    settings = {
        "model_id": model_id,
        "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        "plan": features.plan.to_dict(),
        "parameters": None if features.parameters is None else list(features.parameters),
        "dtype": features.dtype,
        "mixed_precision": features.mixed_precision,
        "curvature": config.to_dict(),
        "layout": computer.layout.to_dict()["blocks"],
        "rest": computer.layout.to_dict()["rest"]["numel"],
        "dataset_fingerprint": dataset.fingerprint(),
    }
    record = _open_record(path, settings, distributed)
    output_size = int(np.prod(computer.encode(dataset.images[:1]).shape[1:]))
    info = {"n_images": len(dataset), "output_size": output_size, "settings": settings}
    if not record.get("complete"):
        # In a helper: its arrays are freed before the estimate is read back.
        _compute(
            computer,
            dataset,
            plan,
            config,
            path,
            record,
            modules,
            info,
            distributed,
            batch_size=batch_size,
            chunk_size=chunk_size,
            progress=progress,
        )
    return _load(path, read_json(path / SETTINGS_FILE), modules, info)


def _compute(
    computer: _StageComputer,
    dataset: ImageDataset,
    plan: Plan,
    config: CurvatureConfig,
    path: Path,
    record: dict[str, Any],
    modules: list[str],
    info: dict[str, Any],
    distributed: Distributed,
    *,
    batch_size: int,
    chunk_size: int,
    progress: bool,
) -> None:
    """Both passes (resumed where partial sums are saved); rank 0 writes the estimate."""
    own = dataset.ids[distributed.block(len(dataset))]
    run = _Pass(computer, dataset, plan, config, own, info["output_size"], batch_size, chunk_size)
    pairs = len(dataset) * len(plan)
    if record.get("factors") is None:
        computer.stage = "factors"
        sums = _reduced(
            run(path / f"partial-factors-{part_name(distributed)}.safetensors", progress),
            distributed,
        )
        if distributed.rank == 0:
            _write_factors(path, record, sums, modules, pairs, info)
        del sums  # the factor sums are on disk: not held through the second pass
        distributed.barrier()
        record = read_json(path / SETTINGS_FILE)
    partial = Curvature.from_arrays(_read(path / _FACTORS_FILE, record["factors"]), modules, **info)
    computer.stage = "eigenvalues"
    computer.projector = CurvatureProjector(
        computer.layout, partial, kind=None, device=computer.device
    )
    sums = _reduced(
        run(path / f"partial-eigenvalues-{part_name(distributed)}.safetensors", progress),
        distributed,
    )
    computer.projector = None
    if distributed.rank == 0:
        for index, module in enumerate(modules):
            layer = partial.layers[module]
            ekfac = sums.get(f"{index}.ekfac", np.zeros((layer.s.shape[0], layer.a.shape[0])))
            partial.layers[module] = _with_ekfac(layer, ekfac / pairs)
        rest = sums.get("rest", np.zeros(computer.layout.rest_numel)) / pairs
        whole = Curvature(partial.layers, rest if computer.layout.rest else None, **info)
        _save(path / CURVATURE_FILE, whole.to_arrays())
        record = {**record, "complete": True, "sha256": sha256_file(path / CURVATURE_FILE)}
        write_json(path / SETTINGS_FILE, record)
        (path / _FACTORS_FILE).unlink(missing_ok=True)
    distributed.barrier()
    for stage in ("factors", "eigenvalues"):
        (path / f"partial-{stage}-{part_name(distributed)}.safetensors").unlink(missing_ok=True)


def _reduced(sums: dict[str, np.ndarray], distributed: Distributed) -> dict[str, np.ndarray]:
    return {name: distributed.all_reduce_sum(value) for name, value in sums.items()}


def _write_factors(
    path: Path,
    record: dict[str, Any],
    sums: dict[str, np.ndarray],
    modules: list[str],
    pairs: int,
    info: dict[str, Any],
) -> None:
    """Rank 0: the factors' means and eigen-decompositions, saved, and the record updated."""
    layers = {m: _decompose(sums, i, pairs) for i, m in enumerate(modules)}
    _save(path / _FACTORS_FILE, Curvature(layers, None, **info).to_arrays())
    write_json(path / SETTINGS_FILE, {**record, "factors": sha256_file(path / _FACTORS_FILE)})


def _with_ekfac(layer: LayerCurvature, ekfac: np.ndarray) -> LayerCurvature:
    values = _layer_arrays(layer)
    values["ekfac"] = ekfac
    return LayerCurvature(**values)


class _Pass:
    """One pass of the stage over this rank's images, in chunks whose running sums are saved."""

    def __init__(
        self,
        computer: _StageComputer,
        dataset: ImageDataset,
        plan: Plan,
        config: CurvatureConfig,
        ids: np.ndarray,
        output_size: int,
        batch_size: int,
        chunk_size: int,
    ) -> None:
        self.computer, self.dataset, self.plan, self.config = computer, dataset, plan, config
        self.ids, self.output_size = ids, output_size
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.rows = {int(i): row for row, i in enumerate(dataset.ids)}

    def __call__(self, partial: Path, progress: bool) -> dict[str, np.ndarray]:
        chunks = [
            self.ids[s : s + self.chunk_size] for s in range(0, len(self.ids), self.chunk_size)
        ]
        done = 0
        self.computer.sums = {}
        if partial.is_file():
            arrays = load_file(str(partial))
            done = int(arrays.pop("chunks_done")[0])
            device = self.computer.device
            self.computer.sums = {
                k: torch.from_numpy(v.copy()).to(device) for k, v in arrays.items()
            }
        remaining = sum(len(c) for c in chunks[done:])
        bar = tqdm(total=remaining, desc=f"curvature {self.computer.stage}", disable=not progress)
        for index in range(done, len(chunks)):
            for start in range(0, len(chunks[index]), self.batch_size):
                batch_ids = chunks[index][start : start + self.batch_size]
                self._batch(batch_ids)
                bar.update(len(batch_ids))
            _save(partial, self._sums() | {"chunks_done": np.array([index + 1])})
        bar.close()
        return self._sums()

    def _sums(self) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.computer.sums.items()}

    def _batch(self, ids: np.ndarray) -> None:
        rows = torch.as_tensor([self.rows[int(i)] for i in ids])
        prompts = self.dataset.prompts
        x0 = self.computer.encode(self.dataset.images[rows])
        cond = self.computer.condition(None if prompts is None else [prompts[r] for r in rows])
        for step, timestep in enumerate(self.plan.timesteps):
            noise = self.plan.noise_for(step, ids, tuple(x0.shape[1:]))
            directions = output_directions(self.config, step, ids, self.output_size)
            self.computer.accumulate(x0, int(timestep), noise, cond, directions)


def output_directions(config: CurvatureConfig, step: int, ids: np.ndarray, size: int) -> Tensor:
    """The output directions u of each image at plan step ``step``: (B, r, D), float64.

    ``sampled``: r = ``samples`` draws of N(0, 2/(D r) I), from ``(seed, "fisher", step, id)``,
    so that their outer products sum to the GGN's (2/D) I in expectation; ``exact``: the D
    directions sqrt(2/D) e_j, whose outer products sum to it exactly.
    """
    if config.fisher == "exact":
        basis = math.sqrt(2 / size) * torch.eye(size, dtype=torch.float64)
        return basis.expand(len(ids), size, size)
    draws = [
        torch.randn(
            (config.samples, size),
            generator=generator(config.seed, "fisher", step, int(i)),
            dtype=torch.float64,
        )
        for i in ids
    ]
    return math.sqrt(2 / (size * config.samples)) * torch.stack(draws)


def _decompose(sums: dict[str, np.ndarray], index: int, pairs: int) -> LayerCurvature:
    """A layer's factors (means over the pairs) and their decreasing eigen-decompositions."""
    a = sums[f"{index}.a"] / pairs
    s = sums[f"{index}.s"] / pairs
    a_values, a_basis = _eigh(a)
    s_values, s_basis = _eigh(s)
    return LayerCurvature(a, s, a_values, a_basis, s_values, s_basis)


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    # Decreasing, so that the first columns are the top eigenvectors; a PSD matrix's tiny
    # negative eigenvalues are rounding.
    return np.clip(values[::-1], 0, None).copy(), vectors[:, ::-1].copy()


def _open_record(path: Path, settings: dict[str, Any], distributed: Distributed) -> dict[str, Any]:
    """Check ``path``'s record against ``settings`` on every rank; rank 0 creates a new one."""
    file = path / SETTINGS_FILE
    if file.is_file():
        record = read_json(file)
        if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{file}: not a diffattr curvature of version {FORMAT_VERSION}"
            )
        stored = record.get("settings", {})
        differing = sorted(
            k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k)
        )
        if differing:
            raise StoreMismatchError(
                f"{path}: the curvature there was estimated with other settings "
                f"({', '.join(differing)} differ); use another directory, or delete {path} to "
                "recompute"
            )
        return record
    distributed.barrier()  # every rank has looked before rank 0 creates it
    if distributed.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "factors": None,
            "complete": False,
            "sha256": None,
        }
        write_json(file, record)
    distributed.barrier()
    return read_json(file)


def _save(file: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(file, lambda tmp: save_file(arrays, str(tmp)))


def _read(file: Path, sha256: str) -> dict[str, np.ndarray]:
    if not file.is_file() or sha256_file(file) != sha256:
        raise StoreCorruptError(
            f"{file}: missing or changed since it was written; delete {file.parent} to recompute"
        )
    return load_file(str(file))


def _load(
    path: Path, record: dict[str, Any], modules: list[str], info: dict[str, Any]
) -> Curvature:
    arrays = _read(path / CURVATURE_FILE, record["sha256"])
    return Curvature.from_arrays(arrays, modules, sha256=record["sha256"], **info)
