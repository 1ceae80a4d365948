"""The linear datamodeling score as a metric: rank correlations, bootstrap, noise ceiling.

Pure numpy on arrays (subset masks, measured losses, scores); the benchmark that produces the
arrays is ``_lds.py`` and the glue from saved scores to a result is ``_lds_score.py``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from diffattr._seed import derive_seed
from diffattr.errors import ConfigError


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of two (M, Q) arrays (ties: mean ranks).

    A column that is constant in either array has no ranking and gets correlation 0.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ConfigError(
            f"spearman_columns needs two equal (M, Q) arrays, got {a.shape}, {b.shape}"
        )
    return _pearson(rankdata(a, axis=-2), rankdata(b, axis=-2))


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-2, keepdims=True)
    b = b - b.mean(axis=-2, keepdims=True)
    num = (a * b).sum(axis=-2)
    den = np.sqrt((a * a).sum(axis=-2) * (b * b).sum(axis=-2))
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 0.0)


def lds_from_arrays(
    masks: np.ndarray,
    losses: np.ndarray,
    scores: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float, tuple[float, float], np.ndarray]:
    """LDS of a score matrix against measured losses.

    Args:
        masks: (M, N) bool subset masks.
        losses: (M, Q) measured losses of each query under each subset's model (lower: the
            subset helped the query).
        scores: (Q, N) attribution scores, positive meaning the training image helped.
        n_bootstrap: Resamples of the subsets for the confidence interval (0: none).
        seed: Seed of the resampling.

    Returns:
        (LDS, (low, high) 95% interval, per-query Spearman correlations).
    """
    predicted = masks.astype(np.float64) @ scores.astype(np.float64).T
    outcome = -losses
    per_query = spearman_columns(predicted, outcome)
    lds = float(per_query.mean())
    if n_bootstrap <= 0:
        return lds, (lds, lds), per_query
    rng = np.random.default_rng(derive_seed(seed, "lds-bootstrap"))
    n_subsets = len(masks)
    means = []
    for start in range(0, n_bootstrap, 100):
        rows = rng.integers(0, n_subsets, size=(min(100, n_bootstrap - start), n_subsets))
        means.append(spearman_columns(predicted[rows], outcome[rows]).mean(axis=-1))
    low, high = np.quantile(np.concatenate(means), [0.025, 0.975])
    return lds, (float(low), float(high)), per_query


def noise_ceiling(truth: np.ndarray) -> tuple[float | None, float | None, str | None]:
    """Split-half reliability of an (M, S, R, Q) ground truth, and the ceiling it implies.

    Returns:
        (split-half mean Spearman r, ceiling sqrt(2r / (1 + r)), basis); Nones when S = R = 1.
    """
    if truth.shape[1] >= 2:
        first, second = truth[:, 0::2].mean(axis=(1, 2)), truth[:, 1::2].mean(axis=(1, 2))
        basis = "model seeds"
    elif truth.shape[2] >= 2:
        first, second = truth[:, :, 0::2].mean(axis=(1, 2)), truth[:, :, 1::2].mean(axis=(1, 2))
        basis = "noise draws"
    else:
        return None, None, None
    r = float(spearman_columns(first, second).mean())
    ceiling = math.sqrt(2 * r / (1 + r)) if r > 0 else 0.0
    return r, ceiling, basis
