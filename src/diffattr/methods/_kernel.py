"""Kernel methods: TRAK, D-TRAK and DAS (docs/methods.md, the section of the same name).

All three use the damped kernel K = Phi^T Phi + lambda I of the training features (k x k,
accumulated in float64 in blocks of training rows). With r outputs per sample
(``output_projection``) the r rows of each sample are stacked: K = sum_i J_i^T J_i + lambda I,
J_i the (r, k) features.

lambda is never tuned on the evaluation queries: it is ``damping`` times the mean eigenvalue of
Phi^T Phi (trace / k), a scale-free rule, and the value used is recorded with the scores.

DAS can take the Gauss-Newton matrix of the training loss instead of K (``curvature="ekfac"`` or
``"kfac"``): its features are then preconditioned in the curvature's eigenbasis
(``features/_preconditioned.py``) and the kernel becomes the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreMismatchError
from diffattr.features import FeatureConfig, OutputConfig, ShardedStore
from diffattr.features._curvature import CurvatureConfig
from diffattr.features._preconditioned import (
    PreconditionedFeaturizer,
    StreamedFeatures,
    curvature_features,
)
from diffattr.methods._base import AttributionMethod, Features, Featurizer

Transform = Literal["linear", "squared", "signed_square"]
#: Training rows per block when accumulating the kernel and scoring.
_BLOCK = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelConfig:
    """Settings shared by the kernel methods."""

    damping: float = field(
        default=1e-2,
        metadata={"help": "lambda as a multiple of the mean eigenvalue of Phi^T Phi"},
    )
    transform: Transform = field(
        default="linear", metadata={"help": "score transform: linear, squared or signed_square"}
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.damping, int | float) and self.damping >= 0):
            raise ConfigError(f"damping={self.damping!r} is invalid: must be a number >= 0")
        if self.transform not in ("linear", "squared", "signed_square"):
            raise ConfigError(
                f"transform={self.transform!r} is invalid: must be linear, squared or signed_square"
            )


@dataclass(frozen=True, slots=True)
class Kernel:
    """The factorised damped kernel of one checkpoint's training features.

    ``factor`` is None for a kernel restored from its scalars alone (DAS keeps its directions,
    which already hold K^-1).
    """

    factor: tuple[np.ndarray, bool] | None
    lam: float
    mean_eigenvalue: float

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Return K^-1 rhs for rhs of shape (k, m), in float64."""
        if self.factor is None:
            raise ConfigError("this kernel was saved without its factor: fit again to solve")
        return scipy.linalg.cho_solve(self.factor, rhs)


@dataclass(frozen=True, slots=True)
class Preconditioned:
    """The identity kernel of features already preconditioned by a curvature estimate.

    Attributes:
        lam: The lambda the features were damped with.
        mean_eigenvalue: The curvature's mean eigenvalue (lambda / damping).
        preconditioner: The store's record of the preconditioning (kind, damping, scale).
    """

    lam: float
    mean_eigenvalue: float
    preconditioner: dict[str, Any]

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Return rhs: (G + lambda I)^-1 is already in the features."""
        return rhs


def preconditioned(train: Features, kind: str, damping: float, method: str) -> Preconditioned:
    """The preconditioning recorded with ``train``'s features, checked against what is wanted.

    Raises:
        StoreMismatchError: The features were not preconditioned, or with another curvature
            kind or damping (make them with the method's :meth:`featurizer`, or
            :func:`~diffattr.methods.attribute`).
    """
    record = train.settings.get("projector", {}).get("preconditioner")
    if not record or record.get("kind") != kind or record.get("damping") != damping:
        raise StoreMismatchError(
            f"{train.path}: {method} needs features preconditioned by the {kind} curvature with "
            f"damping {damping}, found {record}; featurise with the method's featurizer (as "
            "attribute() does)"
        )
    curvature = train.settings["projector"]["curvature"]
    return Preconditioned(
        record["lambda"], record["mean_eigenvalue"], record | {"curvature": curvature["sha256"]}
    )


def fit_kernel(features: Any, damping: float) -> Kernel:
    """Factorise K = Phi^T Phi + lambda I, lambda = damping * trace(Phi^T Phi) / k.

    Args:
        features: (N, r, k) training features: an array or memmap (read in blocks), or a
            :class:`~diffattr.features.ShardedStore`'s, whose rows are split over the ranks of a
            distributed job: each rank then sums its own rows and the sums are all-reduced.
        damping: Relative damping; 0 needs Phi^T Phi to be positive definite.

    Raises:
        ConfigError: The kernel is singular (give a damping > 0).
    """
    if isinstance(features, ShardedStore):
        rows, reduce = features.local_rows, features.distributed.all_reduce_sum
        features = features.array("features")
    else:
        rows, reduce = slice(0, len(features)), None
    k = features.shape[-1]
    gram = np.zeros((k, k))
    for start in range(rows.start, rows.stop, _BLOCK):
        stop = min(start + _BLOCK, rows.stop)
        block = np.asarray(features[start:stop], dtype=np.float64).reshape(-1, k)
        gram += block.T @ block
    if reduce is not None:
        gram = reduce(gram)
    mean_eigenvalue = float(np.trace(gram)) / k
    lam = damping * mean_eigenvalue
    gram[np.diag_indices(k)] += lam
    try:
        factor = scipy.linalg.cho_factor(gram)
    except np.linalg.LinAlgError as err:
        raise ConfigError(
            f"the kernel Phi^T Phi + lambda I is singular (lambda={lam:g}); use damping > 0"
        ) from err
    return Kernel(factor=factor, lam=lam, mean_eigenvalue=mean_eigenvalue)


def _kernel_saved(kernel: Kernel) -> dict[str, Any]:
    """A kernel's Cholesky factor and scalars, as :meth:`AttributionMethod.saved_state` keeps."""
    factor, lower = kernel.factor
    return {
        "factor": np.asarray(factor),
        "lower": bool(lower),
        "lam": kernel.lam,
        "mean_eigenvalue": kernel.mean_eigenvalue,
    }


def _kernel_restored(saved: dict[str, Any]) -> Kernel:
    factor = (np.asarray(saved["factor"]), bool(saved["lower"]))
    return Kernel(factor=factor, lam=saved["lam"], mean_eigenvalue=saved["mean_eigenvalue"])


def _kernel_of(train: Features, damping: float) -> Kernel:
    return fit_kernel(
        train if isinstance(train, ShardedStore) else train.array("features"), damping
    )


def _transform(values: np.ndarray, transform: Transform) -> np.ndarray:
    if transform == "squared":
        return values**2
    if transform == "signed_square":
        return np.sign(values) * values**2
    return values


class _KernelMethod(AttributionMethod):
    """TRAK-style scores phi(x)^T K^-1 phi(z_i), summed over the r outputs."""

    output_kind: str

    def features(self, base: FeatureConfig) -> FeatureConfig:
        return replace(base, output=OutputConfig(kind=self.output_kind), normalize=False)

    def _fit_one(self, train: Features) -> Kernel:
        return _kernel_of(train, self.config.damping)

    def _state_to_save(self, state: Kernel) -> dict[str, Any]:
        return _kernel_saved(state)

    def _state_from_saved(self, saved: dict[str, Any]) -> Kernel:
        return _kernel_restored(saved)

    def _score_one(self, state: Kernel, train: Features, query: Features) -> np.ndarray:
        queries = np.asarray(query.array("features"), dtype=np.float64)
        n_query, r, k = queries.shape
        # A = Q K^-1, computed once; then one matrix product per block of training rows.
        solved = state.solve(queries.reshape(-1, k).T).T.reshape(n_query, r * k)
        train_features = train.array("features")
        out = np.empty((n_query, len(train_features)))
        for start in range(0, len(train_features), _BLOCK):
            block = np.asarray(train_features[start : start + _BLOCK], dtype=np.float64)
            out[:, start : start + len(block)] = solved @ block.reshape(len(block), -1).T
        return _transform(out, self.config.transform)

    def _extra_settings(self) -> dict[str, Any]:
        return {
            "lambda": [s.lam for s in self._fit_state],
            "mean_eigenvalue": [s.mean_eigenvalue for s in self._fit_state],
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TRAKConfig(KernelConfig):
    """TRAK: kernel scores of diffusion-loss gradients."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DTRAKConfig(KernelConfig):
    """D-TRAK: kernel scores of gradients of the squared norm of the predicted noise."""


class TRAK(_KernelMethod):
    """TRAK (Park et al. 2023) for diffusion: f = the diffusion loss on both sides.

    The score phi(x)^T K^-1 phi(z_i) is the Newton-step prediction of how much the query's loss
    rises when z_i is removed, so positive means z_i helped (TRAK's out-to-loss weight is 1 for
    the diffusion loss).
    """

    name = "trak"
    config_cls = TRAKConfig
    output_kind = "loss"


class DTRAK(_KernelMethod):
    """D-TRAK (Zheng et al. 2024): TRAK's formula with f = ||eps_theta||^2 / D on both sides."""

    name = "dtrak"
    config_cls = DTRAKConfig
    output_kind = "square_norm"


Residual = Literal["signed", "rms", "reference", "none"]
Curvature = Literal["kernel", "kfac", "ekfac"]
Route = Literal["exact", "projected"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DASConfig(KernelConfig):
    """DAS: the predicted change of the query's noise prediction when z_i is removed."""

    transform: Transform = field(
        default="squared",
        metadata={"help": "linear: the signed change (r = 1 only); squared: its squared norm"},
    )
    output: Literal["mean", "output_projection"] = field(
        default="mean", metadata={"help": "output compression: mean, or r random directions"}
    )
    num_directions: int = field(
        default=4, metadata={"help": "r, the directions of output_projection"}
    )
    leverage: bool = field(
        default=True, metadata={"help": "Sherman-Morrison leverage correction (I - L_ii)^-1"}
    )
    residual: Residual | None = field(
        default=None,
        metadata={
            "help": "rms: sqrt of z_i's mean loss, the expected residual size (default with one "
            "output); signed: its compressed residual at the plan's draws (exact for linear "
            "models; default and only choice with several outputs); reference: the DAS code's "
            "normalised form; none"
        },
    )
    curvature: Curvature = field(
        default="kernel",
        metadata={
            "help": "kernel: K = sum_j J_j^T J_j + lambda I of the projected features; ekfac or "
            "kfac: the training loss's Gauss-Newton matrix estimated by EK-FAC or K-FAC "
            "(unnormalised features in its eigenbasis, the top eigenvectors to k)"
        },
    )
    ggn: CurvatureConfig = field(
        default_factory=CurvatureConfig,
        metadata={"help": "how the Gauss-Newton matrix is estimated (curvature kfac, ekfac)"},
    )
    route: Route = field(
        default="exact",
        metadata={
            "help": "K-FAC / EK-FAC: exact (every eigenvector; training gradients streamed "
            "while scoring, p values per query kept) or projected (the top eigenvectors per "
            "layer to k, stored features)"
        },
    )

    def __post_init__(self) -> None:
        KernelConfig.__post_init__(self)
        if self.curvature not in ("kernel", "kfac", "ekfac"):
            raise ConfigError(
                f"curvature={self.curvature!r} is invalid: must be kernel, kfac or ekfac"
            )
        if self.route not in ("exact", "projected"):
            raise ConfigError(f"route={self.route!r} is invalid: must be exact or projected")
        if not isinstance(self.ggn, CurvatureConfig):
            raise ConfigError(f"ggn={self.ggn!r} is invalid: must be a CurvatureConfig")
        if self.residual is None:
            # The squared score is an expectation over the noise, where the residual enters as
            # E[r_i^2] = the mean loss; one draw's signed residual estimates it very noisily.
            several = self.output == "output_projection" and self.num_directions > 1
            object.__setattr__(self, "residual", "signed" if several else "rms")
        if self.residual not in ("signed", "rms", "reference", "none"):
            raise ConfigError(
                f"residual={self.residual!r} is invalid: must be signed, rms, reference or none"
            )
        if self.output not in ("mean", "output_projection"):
            raise ConfigError(
                f"output={self.output!r} is invalid: must be mean or output_projection"
            )
        r = self.num_directions if self.output == "output_projection" else 1
        if r > 1 and self.residual != "signed":
            raise ConfigError(
                f"residual={self.residual!r} needs one output; with "
                f"{r} directions use residual='signed'"
            )
        if r > 1 and self.transform != "squared":
            raise ConfigError(
                "with several output directions DAS is a squared norm: use transform='squared'"
            )


class DAS(AttributionMethod):
    """Diffusion Attribution Score (Lin et al., ICLR 2025); docs/methods.md, section "DAS".

    Linearising eps_theta and taking one Newton step for removing z_i, the change of the query's
    compressed prediction J(x) (an r-vector) is

        pred(x) - pred_without_i(x) = J(x) K^-1 J_i^T (I - L_ii)^-1 rho_i,
        L_ii = J_i K^-1 J_i^T (r x r, the leverage),  K = sum_j J_j^T J_j + lambda I,

    rho_i the compressed residual f(eps) - f(eps_theta) of z_i. For a model linear in its
    parameters trained to its least-squares optimum this is the exact leave-one-out change
    (tests/methods/test_das_exact.py). ``transform="squared"`` (default) gives DAS's
    squared norm of the change; ``"linear"`` the signed change (r = 1).

    Features use per-step unit-normalised gradients by default (the DAS code's practice); the
    residual of step t is then scaled by the same 1/||g_t||, so J_t^T rho_t keeps its pairing.

    With ``curvature="ekfac"`` (or ``"kfac"``) K is the Gauss-Newton matrix of the training
    loss in DAS's units, sum_i E_t[J_{i,t}^T J_{i,t}] over the full output, plus lambda I
    (lambda = damping x its mean eigenvalue), estimated on the training images; features are
    then unnormalised, since G is in the loss's units.
    """

    name = "das"
    config_cls = DASConfig

    def features(self, base: FeatureConfig) -> FeatureConfig:
        output = OutputConfig(
            kind=self.config.output,
            num_directions=self.config.num_directions,
            seed=base.output.seed,
        )
        if self.config.curvature == "kernel":
            return replace(base, output=output)
        return curvature_features(replace(base, output=output))

    def featurizer(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        out_dir: Path,
        **options: Any,
    ) -> Featurizer | None:
        """With a curvature: estimate it on ``train``, then precondition by it (either route)."""
        if self.config.curvature == "kernel":
            return None
        return PreconditionedFeaturizer(
            model,
            scheduler_config,
            train,
            features,
            self.config.ggn,
            out_dir,
            kind=self.config.curvature,
            damping=self.config.damping,
            exact=self.config.route == "exact",
            kernel_units=True,
            **options,
        )

    def _fit_one(self, train: Features) -> tuple[Kernel | Preconditioned, np.ndarray | None]:
        kernel: Kernel | Preconditioned
        if self.config.curvature == "kernel":
            kernel = _kernel_of(train, self.config.damping)
        else:
            kernel = preconditioned(train, self.config.curvature, self.config.damping, self.name)
        if isinstance(train, StreamedFeatures):
            # p values per image: the directions are made a block at a time while scoring.
            return kernel, None
        n, _, k = train.array("features").shape
        directions = np.empty((n, k))
        for start in range(0, n, _BLOCK):
            rows = slice(start, min(start + _BLOCK, n))
            directions[rows] = self._directions(kernel, train, rows)
        return kernel, directions

    def _directions(
        self, kernel: Kernel | Preconditioned, train: Features, rows: slice
    ) -> np.ndarray:
        """v_i = K^-1 J_i^T (I - L_ii)^-1 rho_i of the training samples ``rows``: (b, k)."""
        block = np.asarray(train.array("features")[rows], dtype=np.float64)  # (b, r, k)
        _, r, k = block.shape
        solved = kernel.solve(block.reshape(-1, k).T).T.reshape(block.shape)  # K^-1 J_i^T
        rho = self._residual_weights(train, rows)  # (b, r)
        if self.config.leverage:
            leverage = np.einsum("brk,bsk->brs", block, solved)
            rho = np.linalg.solve(np.eye(r) - leverage, rho[..., None])[..., 0]
        return np.einsum("brk,br->bk", solved, rho)

    def _score_one(
        self,
        state: tuple[Kernel | Preconditioned, np.ndarray | None],
        train: Features,
        query: Features,
    ) -> np.ndarray:
        kernel, directions = state
        queries = np.asarray(query.array("features")[:], dtype=np.float64)  # (q, r, k)
        if directions is None:  # streamed training features: one block of images at a time
            assert isinstance(train, StreamedFeatures)
            change = np.empty((len(queries), train.n, queries.shape[1]))
            for start in range(0, train.n, train.batch_size):
                rows = slice(start, min(start + train.batch_size, train.n))
                block = self._directions(kernel, train, rows)
                change[:, rows] = np.einsum("qrk,ik->qir", queries, block)
        else:
            change = np.einsum("qrk,ik->qir", queries, directions)
        if self.config.transform == "squared":
            return (change**2).sum(axis=2)
        return _transform(change[:, :, 0], self.config.transform)

    def _state_to_save(
        self, state: tuple[Kernel | Preconditioned, np.ndarray | None]
    ) -> dict[str, Any] | None:
        kernel, directions = state
        if not isinstance(kernel, Kernel) or directions is None:
            return None  # preconditioned features: the curvature stage keeps its own state
        # Scoring needs only the directions (K^-1 is in them); kept in float64, so a rerun
        # from the saved fit gives the first run's scores bit for bit.
        return {
            "lam": kernel.lam,
            "mean_eigenvalue": kernel.mean_eigenvalue,
            "directions": directions,
        }

    def _state_from_saved(self, saved: dict[str, Any]) -> tuple[Kernel, np.ndarray]:
        kernel = Kernel(factor=None, lam=saved["lam"], mean_eigenvalue=saved["mean_eigenvalue"])
        return kernel, saved["directions"]

    def _residual_weights(self, train: Features, rows: slice) -> np.ndarray:
        """Rho of the training samples ``rows``: (b, r)."""
        if self.config.residual == "none":
            return np.ones((rows.stop - rows.start, 1))
        losses = np.asarray(train.array("losses")[rows], dtype=np.float64)  # (b, K)
        if self.config.residual == "rms":
            return np.sqrt(losses.mean(axis=1, keepdims=True))
        if self.config.residual == "reference":
            # The DAS code: per-step root-MSE, scaled to unit norm over the steps, then averaged.
            root = np.sqrt(losses)
            root /= np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-30)
            return root.mean(axis=1, keepdims=True)
        residuals = np.asarray(train.array("residuals")[rows], dtype=np.float64)  # (b, K, r)
        if train.settings["features"]["normalize"]:
            norms = np.asarray(train.array("grad_norms")[rows], dtype=np.float64)  # (b, K)
            residuals = residuals / np.maximum(norms, 1e-30)[..., None]
        return residuals.mean(axis=1)

    def _extra_settings(self) -> dict[str, Any]:
        extra = {
            "lambda": [s[0].lam for s in self._fit_state],
            "mean_eigenvalue": [s[0].mean_eigenvalue for s in self._fit_state],
        }
        if self.config.curvature != "kernel":
            extra["preconditioner"] = [s[0].preconditioner for s in self._fit_state]
        return extra
