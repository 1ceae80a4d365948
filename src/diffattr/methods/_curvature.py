"""Curvature-based influence: K-FAC and EK-FAC influence functions for diffusion models.

docs/methods.md, "K-FAC / EK-FAC influence". The influence of training image z_i on query x is

    s(x, z_i) = g(x)^T (G + lambda I)^-1 g(z_i),

g the plan-averaged gradient of the diffusion loss (unnormalised) and G the Gauss-Newton matrix of
the training loss estimated by K-FAC or EK-FAC (``features/_curvature.py``); lambda = ``damping``
times G's mean eigenvalue, the kernel methods' rule, recorded with the scores. As for TRAK, a
positive score predicts that removing z_i raises the query's loss: z_i helped.

Two routes (``features/_preconditioned.py``): ``exact`` uses every eigenvector and streams the
training gradients (nothing truncated, nothing stored); ``projected`` keeps the top eigenvectors
of each layer's factors within the projection budget k and stores k features per image, whose
inner products give the influence truncated to those eigen-directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.features import FeatureConfig, OutputConfig
from diffattr.features._curvature import CurvatureConfig, Kind
from diffattr.features._preconditioned import (
    PreconditionedFeaturizer,
    StreamedFeatures,
    curvature_features,
)
from diffattr.methods._base import AttributionMethod, Features, Featurizer
from diffattr.methods._kernel import (
    KernelConfig,
    Preconditioned,
    Route,
    _transform,
    preconditioned,
)

#: Values of training features read at a time when scoring (stored features).
_BLOCK_VALUES = 1 << 24


@dataclass(frozen=True, kw_only=True, slots=True)
class InfluenceConfig(KernelConfig):
    """K-FAC and EK-FAC influence: damping, transform, route and the curvature estimate."""

    damping: float = field(
        default=1e-2,
        metadata={
            "help": "lambda as a multiple of the curvature's mean eigenvalue (K-FAC: s_j a_m, "
            "EK-FAC: the corrected ones)"
        },
    )
    route: Route = field(
        default="exact",
        metadata={
            "help": "exact: every eigenvector, training gradients streamed (p values per query "
            "kept in memory); projected: the top eigenvectors per layer to k, stored features"
        },
    )
    ggn: CurvatureConfig = field(
        default_factory=CurvatureConfig,
        metadata={"help": "how the Gauss-Newton matrix is estimated"},
    )

    def __post_init__(self) -> None:
        KernelConfig.__post_init__(self)
        if self.route not in ("exact", "projected"):
            raise ConfigError(f"route={self.route!r} is invalid: must be exact or projected")
        if not isinstance(self.ggn, CurvatureConfig):
            raise ConfigError(f"ggn={self.ggn!r} is invalid: must be a CurvatureConfig")


class _Influence(AttributionMethod):
    """g(x)^T (G + lambda I)^-1 g(z_i) with G estimated by :attr:`kind`."""

    config_cls = InfluenceConfig
    kind: Kind

    def features(self, base: FeatureConfig) -> FeatureConfig:
        output = OutputConfig(kind="loss", seed=base.output.seed)
        return curvature_features(replace(base, output=output))

    def featurizer(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        out_dir: Path,
        **options: Any,
    ) -> Featurizer:
        """Estimate the curvature on ``train``; featurise preconditioned by it (either route)."""
        return PreconditionedFeaturizer(
            model,
            scheduler_config,
            train,
            features,
            self.config.ggn,
            out_dir,
            kind=self.kind,
            damping=self.config.damping,
            exact=self.config.route == "exact",
            kernel_units=False,
            **options,
        )

    def _fit_one(self, train: Features) -> Preconditioned:
        return preconditioned(train, self.kind, self.config.damping, self.name)

    def _score_one(self, state: Preconditioned, train: Features, query: Features) -> np.ndarray:
        queries = np.asarray(query.array("features")[:], dtype=np.float64)
        n_query = len(queries)
        queries = queries.reshape(n_query, -1)
        train_features = train.array("features")
        n = len(train_features)
        width = queries.shape[1]
        block = (
            train.batch_size
            if isinstance(train, StreamedFeatures)
            else max(1, _BLOCK_VALUES // width)
        )
        out = np.empty((n_query, n))
        for start in range(0, n, block):
            rows = np.asarray(train_features[start : start + block], dtype=np.float64)
            out[:, start : start + len(rows)] = queries @ rows.reshape(len(rows), -1).T
        return _transform(out, self.config.transform)

    def _extra_settings(self) -> dict[str, Any]:
        return {
            "lambda": [s.lam for s in self._fit_state],
            "mean_eigenvalue": [s.mean_eigenvalue for s in self._fit_state],
            "preconditioner": [s.preconditioner for s in self._fit_state],
        }


class KFAC(_Influence):
    """Influence with G ~ S (x) A per layer (K-FAC, Martens & Grosse 2015)."""

    name = "kfac"
    kind = "kfac"


class EKFAC(_Influence):
    """Influence with K-FAC's eigenbasis and corrected eigenvalues (EK-FAC).

    George et al. 2018; as influence functions Grosse et al. 2023, for diffusion models
    Mlodozeniec et al. 2025.
    """

    name = "ekfac"
    kind = "ekfac"
