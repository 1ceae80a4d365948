"""Kronecker-factored projection of per-sample gradients, layer by layer.

A Linear or Conv2d layer's weight gradient (with its bias as one more input column, the input
padded with a constant 1) is a (d_out x d_in) matrix G. The factored projection keeps, per layer,

    P_out^T G P_in        (k_out x k_in values, row-major)

with P_out (d_out x k_out) and P_in (d_in x k_in) drawn independently by :func:`dense_block`
(entries N(0, 1/k) or +-1/sqrt(k)), so that vec(P_out^T G P_in) = (P_out (x) P_in)^T vec(G) and
E ||.||^2 = ||G||^2. A side whose dimension is at most its budget is kept whole (P = identity).
The selected parameters that are not such weights (normalisation scales and shifts, biases whose
weight is not selected) form one "rest" vector, kept whole or projected sparsely. The factored
features are the layer blocks in module order, then the rest; when there are more of them than
the wanted k, a sparse Johnson-Lindenstrauss projection (``nnz`` per coordinate) maps them to k.

Why two stages: a layer whose gradient has rank one (one position per sample: every layer of an
MLP, a UNet's timestep embedding) keeps under P_out (x) P_in only k_out + k_in degrees of freedom,
not k_out k_in, so a Kronecker projection straight to a small k distorts inner products far more
than a dense one of the same size (``benchmarks/bench_kronecker_error.py``). Large factors, then a
cheap sparse map to k, keep the factored backend's cost and lose little.

The same map has two implementations: :class:`KroneckerProjector` applies it to flattened
per-sample gradients (any backend), and the factored backend (``_factored.py``) computes it from
layer inputs and output gradients without ever forming G.

Budget rule (recorded per layer in the store): the factored stage may have
``factored_dim`` features (default 64 k). The layers get the share of it that their parameters
have of all selected parameters; within that share one factor f, the largest with
sum_l min(d_out_l, f) min(d_in_l, f) <= share, sets every layer's (k_out, k_in) =
(min(d_out, f), min(d_in, f)); the rest gets what is left, at most its own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffattr._seed import derive_seed
from diffattr.errors import ConfigError
from diffattr.features._hashing import GENERATOR, dense_block
from diffattr.features._projection import (
    IdentityProjector,
    ProjectionConfig,
    Projector,
    SparseProjector,
)

__all__ = [
    "KroneckerLayout",
    "KroneckerProjector",
    "LayerBlock",
    "RestParameter",
    "uncovered_parameters",
]

#: Default size of the factored stage, in multiples of the final k.
_FACTORED_MULTIPLE = 64
#: Modules whose weight is projected by Kronecker factors.
FACTORED_TYPES = (nn.Linear, nn.Conv2d)
#: Modules whose per-sample affine gradients the factored backend computes directly.
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True, slots=True)
class LayerBlock:
    """One Linear or Conv2d layer's block of features.

    Attributes:
        module: The module's name in the model.
        kind: ``"linear"`` or ``"conv2d"``.
        weight: The weight parameter's name.
        bias: The bias parameter's name when it is selected (the extra input column), else None.
        d_out: Output features or channels.
        d_in: Weight columns (in_features, or in_channels * kh * kw), plus 1 with a bias.
        k_out: Output-side projection size.
        k_in: Input-side projection size.
    """

    module: str
    kind: str
    weight: str
    bias: str | None
    d_out: int
    d_in: int
    k_out: int
    k_in: int

    @property
    def size(self) -> int:
        """Features of this block, k_out * k_in."""
        return self.k_out * self.k_in

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for a store's manifest and ``diffattr plan``."""
        return {
            "module": self.module,
            "kind": self.kind,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "k_out": self.k_out,
            "k_in": self.k_in,
            "bias": self.bias is not None,
        }


@dataclass(frozen=True, slots=True)
class RestParameter:
    """A selected parameter outside the layer blocks, taken whole into the "rest" vector.

    Attributes:
        name: The parameter's name.
        module: Its module's name.
        role: ``"scale"`` (a normalisation weight), ``"shift"`` (a normalisation bias) or
            ``"bias"`` (a Linear or Conv2d bias whose weight is not selected).
        numel: Number of values.
    """

    name: str
    module: str
    role: str
    numel: int


class KroneckerLayout:
    """Which layers a factored projection covers, and each one's (k_out, k_in).

    Args:
        model: The model.
        parameter_names: The selected parameters, in flattening order (see
            :func:`~diffattr.features.select_parameters`).
        config: Projection settings with ``kind="kronecker"``: ``dim`` is the final k,
            ``factored_dim`` the factored stage's budget, ``seed`` and ``distribution`` make the
            factors, ``nnz`` the final sparse stage.

    Attributes:
        blocks: The layer blocks, in module order.
        rest: The other parameters, in ``parameter_names`` order.
        rest_dim: k of the rest's sparse projection (0 without rest).
        factored_dim: Size of the factored stage: block sizes plus ``rest_dim``.
        proj_dim: The final k: ``config.dim``, or ``factored_dim`` when that is smaller (then
            there is no sparse stage).
        grad_dim: p, the number of selected parameter values.

    Raises:
        ConfigError: A selected parameter belongs to a module the factored projection does not
            cover, a grouped convolution, ``dim`` above p, or a factored budget without one
            feature per layer.
    """

    def __init__(
        self, model: nn.Module, parameter_names: Sequence[str], config: ProjectionConfig
    ) -> None:
        if config.kind != "kronecker":
            raise ConfigError(f"KroneckerLayout needs kind='kronecker', got {config.kind!r}")
        self.config = config
        self.parameter_names = list(parameter_names)
        params = dict(model.named_parameters())
        self.parameter_shapes = {name: tuple(params[name].shape) for name in self.parameter_names}
        self.grad_dim = sum(params[name].numel() for name in self.parameter_names)
        if config.dim > self.grad_dim:
            raise ConfigError(
                f"projection dim k={config.dim} exceeds the number of parameters "
                f"p={self.grad_dim}; use a smaller ProjectionConfig.dim (k = p keeps every "
                "gradient whole)"
            )
        shapes, rest, uncovered = _coverage(model, self.parameter_names)
        if uncovered:
            shown = ", ".join(f"{name} ({kind})" for name, kind in uncovered[:6])
            shown += ", ..." if len(uncovered) > 6 else ""
            raise ConfigError(
                f"the factored projection covers Linear and Conv2d weights and biases and "
                f"GroupNorm/LayerNorm scales and shifts; {len(uncovered)} selected parameters are "
                f"elsewhere: {shown}. Leave them out with parameter patterns, or use a dense or "
                "sparse projection (backend='vmap')"
            )
        self.rest = rest
        rest_numel = sum(r.numel for r in rest)
        covered_numel = sum(d_out * d_in for *_, d_out, d_in in shapes)
        stage_budget = config.factored_dim or _FACTORED_MULTIPLE * config.dim
        budget = stage_budget
        if rest_numel and shapes:
            budget = stage_budget * covered_numel // (covered_numel + rest_numel)
        factor = _largest_factor([(d_out, d_in) for *_, d_out, d_in in shapes], budget)
        if shapes and factor == 0:
            raise ConfigError(
                f"ProjectionConfig.factored_dim={stage_budget} is too small for a factored "
                f"projection of {len(shapes)} layers: it needs at least one feature per layer "
                f"(>= {-(-len(shapes) * (covered_numel + rest_numel) // max(covered_numel, 1))})"
            )
        self.blocks = [
            LayerBlock(name, kind, w, b, d_out, d_in, min(d_out, factor), min(d_in, factor))
            for name, kind, w, b, d_out, d_in in shapes
        ]
        self.factor = factor
        used = sum(block.size for block in self.blocks)
        self.rest_dim = min(rest_numel, stage_budget - used)
        if rest_numel and self.rest_dim < 1:
            raise ConfigError(
                f"ProjectionConfig.factored_dim={stage_budget} leaves no features for the "
                f"{rest_numel} normalisation and bias values; use a larger one"
            )
        self.factored_dim = used + self.rest_dim
        self.proj_dim = min(config.dim, self.factored_dim)

    @property
    def rest_numel(self) -> int:
        """Number of values in the rest vector."""
        return sum(r.numel for r in self.rest)

    def to_dict(self) -> dict[str, Any]:
        """What determines the features (JSON types): recorded in a store's manifest."""
        return {
            "factor": self.factor,
            "blocks": [block.to_dict() for block in self.blocks],
            "rest": {
                "numel": self.rest_numel,
                "dim": self.rest_dim,
                "projection": "identity" if self.rest_dim == self.rest_numel else "sparse",
            },
            "factored_dim": self.factored_dim,
            "final": "sparse" if self.factored_dim > self.proj_dim else None,
            "proj_dim": self.proj_dim,
        }

    def factors(
        self, block: LayerBlock, *, dtype: torch.dtype, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """Return ``(P_out, P_in)`` of ``block``: (d_out, k_out) and (d_in, k_in).

        Entries come from :func:`dense_block` with seeds derived from the projection seed and
        the module name, so a layer's factors do not depend on which other layers are selected.
        A side kept whole is the identity.
        """
        return (
            self._factor(block, "out", block.d_out, block.k_out, dtype, device),
            self._factor(block, "in", block.d_in, block.k_in, dtype, device),
        )

    def rest_projector(self, device: torch.device | str = "cpu") -> Projector:
        """The sparse projection of the rest vector (identity when it is kept whole).

        Sparse, not dense: the rest is small in parameters but can get thousands of features,
        and a dense rest_numel x rest_dim matrix would then cost more memory than every factor.
        """
        config = ProjectionConfig(
            kind="sparse",
            dim=max(1, self.rest_dim),
            nnz=min(self.config.nnz, max(1, self.rest_dim)),
            seed=derive_seed(self.config.seed, "kronecker", "rest") % (1 << 31),
            max_memory_mb=self.config.max_memory_mb,
        )
        if self.rest_dim == self.rest_numel:
            return IdentityProjector(config, max(1, self.rest_numel), device)
        return SparseProjector(config, self.rest_numel, device)

    def final_projector(self, device: torch.device | str = "cpu") -> Projector | None:
        """The sparse map from the factored features to k; None when they are k or fewer."""
        if self.factored_dim <= self.proj_dim:
            return None
        config = ProjectionConfig(
            kind="sparse",
            dim=self.proj_dim,
            nnz=min(self.config.nnz, self.proj_dim),
            seed=derive_seed(self.config.seed, "kronecker", "final") % (1 << 31),
            max_memory_mb=self.config.max_memory_mb,
        )
        return SparseProjector(config, self.factored_dim, device)

    def _factor(
        self,
        block: LayerBlock,
        side: str,
        dim: int,
        k: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Tensor:
        if k == dim:
            return torch.eye(dim, dtype=dtype, device=device)
        seed = derive_seed(self.config.seed, "kronecker", block.module, side) % (1 << 31)
        return dense_block(
            seed, range(dim), k, self.config.distribution, dtype=dtype, device=device
        ).to(dtype)

    def describe(self) -> list[str]:
        """Lines of per-layer feature sizes and the total k, for ``diffattr plan``."""
        lines = [
            f"  {b.module or '(model)':48s} {b.kind:6s} {b.d_out:>6d} x {b.d_in:<6d} -> "
            f"{b.k_out:>4d} x {b.k_in:<4d} = {b.size:>7d}"
            for b in self.blocks
        ]
        if self.rest:
            lines.append(
                f"  {'norm scales/shifts, other biases':48s} {'sparse':6s} {self.rest_numel:>15d} "
                f"-> {self.rest_dim:>18d}"
            )
        lines.append(
            f"  factored features: {self.factored_dim:,} ({len(self.blocks)} layers, factor "
            f"{self.factor}; p = {self.grad_dim:,})"
        )
        if self.factored_dim > self.proj_dim:
            lines.append(f"  then sparse (nnz {self.config.nnz}) to total k = {self.proj_dim}")
        else:
            lines.append(f"  total k = {self.proj_dim} (no second stage)")
        return lines


class KroneckerProjector(Projector):
    """The factored projection applied to flattened per-sample gradients (B, p) -> (B, k).

    This is the reference implementation of the map (any backend can feed it); the factored
    backend computes the same features without forming the gradients.

    Args:
        layout: The layer layout and budgets.
        device: Where :meth:`prepare` builds the factors.
    """

    def __init__(self, layout: KroneckerLayout, device: str | torch.device = "cpu") -> None:
        super().__init__(layout.config, layout.grad_dim, layout.proj_dim, device)
        self.layout = layout
        offsets, start = {}, 0
        for name in layout.parameter_names:
            size = 1
            for dim in layout.parameter_shapes[name]:
                size *= dim
            offsets[name] = (start, start + size)
            start += size
        self._offsets = offsets
        self._rest = layout.rest_projector(device) if layout.rest else None
        self._final = layout.final_projector(device)
        self._factors: dict[tuple[str, torch.dtype, str], tuple[Tensor, Tensor]] = {}

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`Projector.to_dict`; adds the seed, distribution and the layout."""
        extra = {"distribution": self.config.distribution, "seed": self.config.seed}
        return super().to_dict() | extra | {"generator": GENERATOR, "layout": self.layout.to_dict()}

    def project(self, grads: Tensor) -> Tensor:
        """Return the factored features of ``grads``: (B, p) -> (B, k)."""
        self._check(grads)
        batch = grads.shape[0]
        parts = []
        for block in self.layout.blocks:
            start, stop = self._offsets[block.weight]
            matrix = grads[:, start:stop].reshape(batch, block.d_out, -1)
            if block.bias is not None:
                b_start, b_stop = self._offsets[block.bias]
                matrix = torch.cat([matrix, grads[:, b_start:b_stop, None]], dim=2)
            p_out, p_in = self.factors(block, grads.dtype, grads.device)
            parts.append((p_out.T @ matrix @ p_in).reshape(batch, -1))
        if self._rest is not None:
            rest = torch.cat(
                [grads[:, slice(*self._offsets[r.name])] for r in self.layout.rest], dim=1
            )
            parts.append(self.project_rest(rest))
        return self.project_final(torch.cat(parts, dim=1))

    def factors(
        self, block: LayerBlock, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``(P_out, P_in)`` of ``block``, made once per dtype and device and kept.

        They are small: d_out k_out + d_in k_in values.
        """
        key = (block.module, dtype, str(device))
        if key not in self._factors:
            self._factors[key] = self.layout.factors(block, dtype=dtype, device=device)
        return self._factors[key]

    def whole_sides(self, block: LayerBlock) -> tuple[bool, bool]:
        """Whether ``block``'s (output, input) factor is the identity, so that it can be skipped."""
        return block.k_out == block.d_out, block.k_in == block.d_in

    def project_final(self, factored: Tensor) -> Tensor:
        """Map (B, factored_dim) factored features to (B, k) (unchanged without a final stage)."""
        return factored if self._final is None else self._final.project(factored)

    def project_rest(self, rest: Tensor) -> Tensor:
        """Project a (B, rest numel) batch of rest vectors to (B, rest_dim)."""
        assert self._rest is not None
        return self._rest.project(rest)


def uncovered_parameters(model: nn.Module, parameter_names: Sequence[str]) -> list[str]:
    """The names among ``parameter_names`` that the factored projection cannot take.

    Raises:
        ConfigError: A selected grouped convolution.
    """
    return [name for name, _ in _coverage(model, parameter_names)[2]]


_Shape = tuple[str, str, str, str | None, int, int]


def _coverage(
    model: nn.Module, parameter_names: Sequence[str]
) -> tuple[list[_Shape], list[RestParameter], list[tuple[str, str]]]:
    """Sort the selected parameters: layer blocks, the rest, and what is not covered.

    Blocks are (module, kind, weight, bias or None, d_out, d_in), in module order; uncovered
    parameters come as (name, module type).
    """
    selected = set(parameter_names)
    params = dict(model.named_parameters())
    owner: dict[str, tuple[str, nn.Module, str]] = {}
    shapes: list[_Shape] = []
    covered: set[str] = set()
    for module_name, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            if _full(module_name, attr) in selected:
                owner.setdefault(_full(module_name, attr), (module_name, module, attr))
        weight = _full(module_name, "weight")
        if not (isinstance(module, FACTORED_TYPES) and weight in selected):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(
                f"{module_name}: grouped convolutions (groups={module.groups}) are not "
                "covered by the factored projection; leave them out with parameter "
                "patterns or use backend='vmap' with a dense projection"
            )
        bias: str | None = _full(module_name, "bias")
        bias = bias if bias in selected else None
        d_out = int(module.weight.shape[0])
        d_in = int(module.weight[0].numel()) + (bias is not None)
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        shapes.append((module_name, kind, weight, bias, d_out, d_in))
        covered.update(n for n in (weight, bias) if n is not None)
    rest: list[RestParameter] = []
    uncovered: list[tuple[str, str]] = []
    for name in parameter_names:
        if name in covered:
            continue
        module_name, module, attr = owner[name]
        numel = params[name].numel()
        if isinstance(module, NORM_TYPES) and attr in ("weight", "bias"):
            role = "scale" if attr == "weight" else "shift"
            rest.append(RestParameter(name, module_name, role, numel))
        elif isinstance(module, FACTORED_TYPES) and attr == "bias":
            rest.append(RestParameter(name, module_name, "bias", numel))
        else:
            uncovered.append((name, type(module).__name__))
    return shapes, rest, uncovered


def _full(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _largest_factor(dims: list[tuple[int, int]], budget: int) -> int:
    """The largest f with sum min(d_out, f) min(d_in, f) <= budget (0 if even f = 1 is over)."""
    if not dims:
        return 0

    def cost(f: int) -> int:
        return sum(min(o, f) * min(i, f) for o, i in dims)

    low, high = 0, max(max(o, i) for o, i in dims)
    while low < high:  # cost is non-decreasing in f
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
