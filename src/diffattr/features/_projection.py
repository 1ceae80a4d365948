"""Random projections of per-sample gradients: dense (Gaussian or Rademacher), sparse JL, identity.

A projection maps a flattened gradient g (p values) to ``P^T g`` (k values). The entries of ``P``
come from the counter-based hash of :mod:`diffattr.features._hashing`: a pure function of (seed,
row, column), the same on the CPU and on CUDA for any block size or order, generated block by
block on the gradients' device.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from diffattr._config import check_fields, known_fields
from diffattr.errors import ConfigError
from diffattr.features._hashing import GENERATOR, Distribution, dense_block, sparse_buckets

__all__ = [
    "GENERATOR",
    "DenseProjector",
    "IdentityProjector",
    "ProjectionConfig",
    "Projector",
    "SparseProjector",
    "make_projector",
]

ProjectionKind = Literal["auto", "dense", "sparse", "identity", "kronecker"]

# A dense block's size when it is regenerated per call; large enough for an efficient matmul.
_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectionConfig:
    """How per-sample gradients are compressed to ``dim`` features."""

    kind: ProjectionKind = field(
        default="dense",
        metadata={
            "help": "dense random matrix, sparse JL (nnz per coordinate), identity, or "
            "kronecker (per-layer factors P_out (x) P_in; the factored backend's projection); "
            "auto: the backend's (kronecker for factored, dense for vmap; FeatureConfig decides)"
        },
    )
    distribution: Distribution = field(
        default="gaussian",
        metadata={"help": "dense entries: N(0, 1/k) or +-1/sqrt(k) (ignored by sparse/identity)"},
    )
    dim: int = field(default=1024, metadata={"help": "projection dimension k (not for identity)"})
    seed: int = field(default=0, metadata={"help": "seed of the projection matrix"})
    nnz: int = field(default=4, metadata={"help": "sparse: buckets (non-zeros) per coordinate"})
    factored_dim: int = field(
        default=0,
        metadata={
            "help": "kronecker: size of the per-layer factored features before the final "
            "sparse projection to dim (0: 64 x dim; equal to dim: no second stage)"
        },
    )
    max_memory_mb: int = field(
        default=4096,
        metadata={"help": "keep the projection state in memory up to this size, else regenerate"},
    )

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = {
            "kind": (self.kind in get_args(ProjectionKind), _one_of(ProjectionKind)),
            "distribution": (self.distribution in get_args(Distribution), _one_of(Distribution)),
            "dim": (is_int(self.dim) and self.dim >= 1, "an int >= 1"),
            "seed": (is_int(self.seed), "an int"),
            "nnz": (is_int(self.nnz) and self.nnz >= 1, "an int >= 1"),
            "factored_dim": (
                is_int(self.factored_dim)
                and (
                    self.factored_dim == 0 or (is_int(self.dim) and self.factored_dim >= self.dim)
                ),
                "0 (automatic) or an int >= dim",
            ),
            "max_memory_mb": (
                is_int(self.max_memory_mb) and self.max_memory_mb >= 0,
                "an int >= 0",
            ),
        }
        check_fields(
            self,
            {name: ok for name, (ok, _) in checks.items()},
            {name: allowed for name, (_, allowed) in checks.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectionConfig:
        """Rebuild settings from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**known_fields(cls, data))


def _same_device(held: torch.device, wanted: str | torch.device) -> bool:
    """Whether state on ``held`` serves ``wanted`` (``"cuda"`` with no index: the current GPU)."""
    wanted = torch.device(wanted)
    if held.type != wanted.type:
        return False
    if wanted.index is None and wanted.type == "cuda":
        return held.index == torch.cuda.current_device()
    return wanted.index is None or held.index == wanted.index


def _one_of(literal: object) -> str:
    return "one of " + ", ".join(repr(v) for v in get_args(literal))


class Projector(ABC):
    """Maps (B, p) gradients to (B, k) features with a fixed random linear map.

    Attributes:
        config: The settings it was made from.
        grad_dim: p, the gradient length.
        proj_dim: k, the feature length.
        device: Where :meth:`prepare` builds the cached state; :meth:`project` works on the
            gradients' device whatever this is (rebuilding its state there if needed).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        proj_dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(grad_dim, int) or isinstance(grad_dim, bool) or grad_dim < 1:
            raise ConfigError(f"grad_dim={grad_dim!r} is invalid: must be an int >= 1")
        if proj_dim > grad_dim:
            raise ConfigError(
                f"projection dim k={proj_dim} exceeds the number of parameters p={grad_dim}; "
                f"use a smaller ProjectionConfig.dim or kind='identity'"
            )
        self.config = config
        self.grad_dim = grad_dim
        self.proj_dim = proj_dim
        self.device = torch.device(device)

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Project gradients.

        Args:
            grads: (B, p) floating tensor on any device.

        Returns:
            (B, k) tensor in ``grads``' dtype and device.

        Raises:
            ValueError: If ``grads`` is not a (B, p) floating tensor.
        """

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:  # noqa: B027
        """Build the cached state (if any) on :attr:`device` now, not on the first call.

        Args:
            dtype: The dtype of the gradients that will be projected.
        """

    def to_dict(self) -> dict[str, Any]:
        """What determines the projection's values (JSON types), e.g. for a store's manifest.

        Memory settings are left out: they change the speed, never the numbers.
        """
        return {"kind": self.config.kind, "grad_dim": self.grad_dim, "proj_dim": self.proj_dim}

    def _check(self, grads: Tensor) -> None:
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim or not grads.is_floating_point():
            raise ValueError(
                f"grads must be a (B, {self.grad_dim}) floating tensor, "
                f"got {tuple(grads.shape)} {grads.dtype}"
            )

    def _fits(self, num_bytes: int) -> bool:
        return num_bytes <= self.config.max_memory_mb << 20


class IdentityProjector(Projector):
    """No projection: features are the gradients themselves (k = p)."""

    def __init__(
        self, config: ProjectionConfig, grad_dim: int, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(config, grad_dim, grad_dim, device)

    def project(self, grads: Tensor) -> Tensor:
        """Return ``grads`` unchanged ((B, p) -> (B, p))."""
        self._check(grads)
        return grads


class DenseProjector(Projector):
    """``grads @ P`` with P (p x k) from :func:`dense_block`.

    When P fits in ``max_memory_mb`` it is generated once on the gradients' device and kept;
    otherwise it is regenerated block by block on every call, which costs far more than the
    multiply, so callers should pass as many gradient rows per call as memory allows. Both paths
    accumulate ``out += grads[:, rows] @ P[rows]`` over the same row blocks, so they give
    bit-identical results.

    Args:
        config: Settings (kind ``"dense"``).
        grad_dim: p.
        device: Where :meth:`prepare` builds the cached matrix.
        block_rows: Rows of P per block (default: a block of about 64 MB).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        device: str | torch.device = "cpu",
        *,
        block_rows: int | None = None,
    ) -> None:
        super().__init__(config, grad_dim, config.dim, device)
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows or max(1, _BLOCK_BYTES // (4 * config.dim))
        self._matrix: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`Projector.to_dict`; adds distribution, seed and the generator name."""
        extra = {"distribution": self.config.distribution, "seed": self.config.seed}
        return super().to_dict() | extra | {"generator": GENERATOR}

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:
        """Generate and keep P on :attr:`device` now, when it fits in ``max_memory_mb``."""
        self._cached(self.device, dtype)

    def project(self, grads: Tensor) -> Tensor:
        """Return ``grads @ P``: (B, p) -> (B, k), in ``grads``' dtype and on its device."""
        self._check(grads)
        p, k = self.grad_dim, self.proj_dim
        out = torch.zeros((grads.shape[0], k), dtype=grads.dtype, device=grads.device)
        matrix = self._cached(grads.device, grads.dtype)
        buffer = None
        for start in range(0, p, self.block_rows):
            stop = min(start + self.block_rows, p)
            if matrix is not None:
                block = matrix[start:stop]
            else:
                if buffer is None:
                    work = torch.float64 if grads.dtype == torch.float64 else torch.float32
                    size = (min(self.block_rows, p), k)
                    buffer = torch.empty(size, dtype=work, device=grads.device)
                block = dense_block(
                    self.config.seed,
                    range(start, stop),
                    k,
                    self.config.distribution,
                    out=buffer[: stop - start],
                ).to(grads.dtype)
            out.addmm_(grads[:, start:stop], block)
        return out

    def _cached(self, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """P on ``device`` in ``dtype``, generated once; None when it does not fit in memory."""
        p, k = self.grad_dim, self.proj_dim
        if not self._fits(p * k * dtype.itemsize):
            return None
        matrix = self._matrix
        if matrix is None or not _same_device(matrix.device, device) or matrix.dtype != dtype:
            self._matrix = None  # free the old copy before making the new one
            matrix = dense_block(
                self.config.seed, range(p), k, self.config.distribution, dtype=dtype, device=device
            )
            self._matrix = matrix
        return matrix


class SparseProjector(Projector):
    """Sparse Johnson-Lindenstrauss projection with ``nnz`` = s non-zeros per coordinate.

    Coordinate i adds sign_m(i) * g_i to bucket b_m(i) for m < s, where the hash h of (i, slot m)
    gives b_m(i) = (h >> 1) mod k and sign_m(i) = -1/sqrt(s) if h is odd else +1/sqrt(s) (buckets
    may coincide). The map is applied as a (k x p) CSR matrix times the gradients, in blocks of
    coordinates; the blocks are kept when they fit in ``max_memory_mb``. ``distribution`` is
    ignored.

    Args:
        config: Settings (kind ``"sparse"``).
        grad_dim: p.
        device: Where :meth:`prepare` builds the cached blocks.
        block_coords: Coordinates per block (default 2**20).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        device: str | torch.device = "cpu",
        *,
        block_coords: int | None = None,
    ) -> None:
        super().__init__(config, grad_dim, config.dim, device)
        if config.nnz > config.dim:
            raise ConfigError(
                f"ProjectionConfig.nnz={config.nnz} is invalid: must be <= dim={config.dim}"
            )
        if block_coords is not None and block_coords < 1:
            raise ValueError(f"block_coords must be >= 1, got {block_coords}")
        self.block_coords = block_coords or 1 << 20
        self._blocks: list[Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`Projector.to_dict`; adds nnz, seed and the generator name."""
        extra = {"nnz": self.config.nnz, "seed": self.config.seed}
        return super().to_dict() | extra | {"generator": GENERATOR}

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:
        """Build and keep the CSR blocks on :attr:`device` now, when they fit in memory."""
        self._cached(self.device, dtype)

    def project(self, grads: Tensor) -> Tensor:
        """Return the sparse projection: (B, p) -> (B, k), in ``grads``' dtype and device."""
        self._check(grads)
        # Sparse kernels exist for float32 and float64 only; half-precision input goes via float32.
        dtype = grads.dtype if grads.dtype in (torch.float32, torch.float64) else torch.float32
        blocks = self._cached(grads.device, dtype)
        out_t = torch.zeros((self.proj_dim, grads.shape[0]), dtype=dtype, device=grads.device)
        for number, start in enumerate(range(0, self.grad_dim, self.block_coords)):
            stop = min(start + self.block_coords, self.grad_dim)
            if blocks is not None:
                block = blocks[number]
            else:
                block = self._csr_block(start, stop, grads.device, dtype)
            # (k x n) CSR @ (n x B): reads each gradient coordinate once per non-zero.
            out_t += block @ grads[:, start:stop].t().to(dtype)
        return out_t.t().contiguous().to(grads.dtype)

    def _cached(self, device: torch.device, dtype: torch.dtype) -> list[Tensor] | None:
        """All CSR blocks on ``device`` in ``dtype``; None when they do not fit in memory."""
        if not self._fits(self.grad_dim * self.config.nnz * (8 + dtype.itemsize)):
            return None
        blocks = self._blocks
        if blocks is None or not _same_device(blocks[0].device, device) or blocks[0].dtype != dtype:
            self._blocks = None
            blocks = [
                self._csr_block(start, min(start + self.block_coords, self.grad_dim), device, dtype)
                for start in range(0, self.grad_dim, self.block_coords)
            ]
            self._blocks = blocks
        return blocks

    def _csr_block(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (k x (stop - start)) CSR matrix of coordinates [start, stop), built on ``device``."""
        s, k = self.config.nnz, self.proj_dim
        buckets, negative = sparse_buckets(
            self.config.seed, range(start, stop), k, s, device=device
        )
        buckets, negative = buckets.reshape(-1), negative.reshape(-1)
        order = torch.argsort(buckets, stable=True)
        columns = torch.div(order, s, rounding_mode="floor")
        scale = 1.0 / math.sqrt(s)
        values = negative[order].to(dtype).mul_(-2.0).add_(1.0).mul_(scale)
        crow = torch.zeros(k + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.bincount(buckets, minlength=k), 0, out=crow[1:])
        with warnings.catch_warnings():
            # torch flags CSR tensors as beta; the product used here is stable since torch 2.0.
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
            return torch.sparse_csr_tensor(
                crow, columns, values, size=(k, stop - start), check_invariants=False
            )


def make_projector(
    config: ProjectionConfig, grad_dim: int, device: str | torch.device = "cpu"
) -> Projector:
    """Return the projector ``config`` describes for gradients of length ``grad_dim``.

    Args:
        config: The projection settings.
        grad_dim: p, the number of selected parameters.
        device: Where the projector's cached state is built by :meth:`Projector.prepare`.

    Returns:
        A :class:`DenseProjector`, :class:`SparseProjector` or :class:`IdentityProjector`.

    Raises:
        ConfigError: If k > p for dense or sparse, nnz > k for sparse, or grad_dim < 1.
    """
    if config.kind == "kronecker":
        raise ConfigError(
            "a kronecker projection follows the model's layers: build it with "
            "KroneckerProjector(KroneckerLayout(model, parameter_names, config))"
        )
    if config.kind == "auto":
        raise ConfigError(
            "projection kind 'auto' is the backend's choice: resolve it with "
            "FeatureConfig.resolve(model), or name a kind"
        )
    if config.kind == "identity":
        return IdentityProjector(config, grad_dim, device)
    if config.kind == "sparse":
        return SparseProjector(config, grad_dim, device)
    return DenseProjector(config, grad_dim, device)
