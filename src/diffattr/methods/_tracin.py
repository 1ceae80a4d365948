"""TracIn / Diffusion-TracIn and ReTrac, and the gradient-similarity baselines.

The formulas: docs/methods.md, section "TracIn, ReTrac and gradient similarity".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from diffattr.errors import ConfigError
from diffattr.features import FeatureConfig, OutputConfig
from diffattr.methods._base import AttributionMethod, Features

#: Training rows per block when scoring.
_BLOCK = 4096


def _dot_scores(train: Features, query: Features, *, cosine: bool) -> np.ndarray:
    # np.array copies: a float64 store's memmap is read-only and must not be scaled in place.
    queries = np.array(query.array("features"), dtype=np.float64).reshape(query.n, -1)
    if cosine:
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
    features = train.array("features")
    out = np.empty((len(queries), train.n))
    for start in range(0, train.n, _BLOCK):
        block = np.array(features[start : start + _BLOCK], dtype=np.float64)
        block = block.reshape(len(block), -1)
        if cosine:
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-30)
        out[:, start : start + len(block)] = queries @ block.T
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class TracInConfig:
    """TracIn: sum over checkpoints of learning rate x g(x) . g(z_i)."""

    learning_rates: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "one learning rate per checkpoint (None: 1 each, a plain sum)"},
    )

    def __post_init__(self) -> None:
        if self.learning_rates is not None:
            rates = tuple(float(r) for r in self.learning_rates)
            if any(not np.isfinite(r) or r < 0 for r in rates):
                raise ConfigError(f"learning_rates={rates} must be finite and >= 0")
            object.__setattr__(self, "learning_rates", rates)


class TracIn(AttributionMethod):
    """Diffusion-TracIn: sum_c lr_c g_c(x)^T g_c(z_i) with g the (projected) loss gradient.

    Positive: a gradient step on z_i lowered the query's loss, i.e. z_i helped.
    """

    name = "tracin"
    config_cls = TracInConfig
    normalize = False

    def features(self, base: FeatureConfig) -> FeatureConfig:
        return replace(base, output=OutputConfig(kind="loss"), normalize=self.normalize)

    def _fit_one(self, train: Features) -> None:
        return None

    def _score_one(self, state: None, train: Features, query: Features) -> np.ndarray:
        return _dot_scores(train, query, cosine=False)

    def _combine(self, per_checkpoint: list[np.ndarray]) -> np.ndarray:
        rates = self.config.learning_rates or (1.0,) * len(per_checkpoint)
        if len(rates) != len(per_checkpoint):
            raise ConfigError(f"{len(rates)} learning rates for {len(per_checkpoint)} checkpoints")
        return sum(rate * scores for rate, scores in zip(rates, per_checkpoint, strict=True))


class ReTrac(TracIn):
    """Diffusion-ReTrac: TracIn on per-step unit-normalised gradients (no dominating norms)."""

    name = "retrac"
    normalize = True


@dataclass(frozen=True, kw_only=True, slots=True)
class GradSimConfig:
    """Gradient similarity of diffusion-loss gradients: no settings beyond the features."""


class GradDot(AttributionMethod):
    """Dot product of projected gradients, averaged over checkpoints."""

    name = "grad-dot"
    config_cls = GradSimConfig
    cosine = False

    def features(self, base: FeatureConfig) -> FeatureConfig:
        return replace(base, output=OutputConfig(kind="loss"), normalize=False)

    def _fit_one(self, train: Features) -> None:
        return None

    def _score_one(self, state: None, train: Features, query: Features) -> np.ndarray:
        return _dot_scores(train, query, cosine=self.cosine)


class GradCos(GradDot):
    """Cosine similarity of projected gradients, averaged over checkpoints."""

    name = "grad-cos"
    cosine = True
