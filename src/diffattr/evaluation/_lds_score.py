"""From saved scores to an LDS result on a benchmark's query set (or one part of it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from diffattr.errors import ConfigError, DataError
from diffattr.evaluation._lds import LDSBenchmark, QueryPart
from diffattr.evaluation._metric import lds_from_arrays, noise_ceiling
from diffattr.methods import Scores


@dataclass(frozen=True)
class LDSResult:
    """LDS of one score matrix on one query set of a benchmark.

    Attributes:
        method: The scores' method name.
        query_set: Which queries.
        lds: Mean over queries of the Spearman correlation, over subsets, between predicted and
            measured model outputs.
        ci: (low, high) 95% bootstrap interval of ``lds`` over subsets.
        per_query: (Q,) Spearman correlation of each query.
        split_half: Mean Spearman correlation between the ground truths of two halves of the
            models' seeds (of the noise draws when there is one seed per subset); None when
            there is nothing to split.
        ceiling: The noise ceiling: the expected LDS of a perfect predictor against the full
            ground truth, ``sqrt(2 r / (1 + r))`` from the split-half ``r`` (Spearman-Brown).
        ceiling_basis: ``"model seeds"`` or ``"noise draws"`` (then the ceiling ignores
            training noise and is optimistic).
        n_subsets: M.
        settings: The scores' settings (timesteps, projection size...).
    """

    method: str
    query_set: str
    lds: float
    ci: tuple[float, float]
    per_query: np.ndarray
    split_half: float | None
    ceiling: float | None
    ceiling_basis: str | None
    n_subsets: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (per-query values included)."""
        return {
            "method": self.method,
            "query_set": self.query_set,
            "lds": self.lds,
            "ci": list(self.ci),
            "per_query": self.per_query.tolist(),
            "split_half": self.split_half,
            "ceiling": self.ceiling,
            "ceiling_basis": self.ceiling_basis,
            "n_subsets": self.n_subsets,
            "n_queries": len(self.per_query),
            "settings": self.settings,
        }


def lds_score(
    benchmark: LDSBenchmark,
    scores: Scores,
    query_set: str,
    *,
    part: QueryPart = "reported",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """LDS of saved :class:`~diffattr.methods.Scores` on a benchmark's query set.

    The score matrix's columns and rows are matched to the benchmark by sample id, so any order
    is accepted; different id sets are refused.

    Args:
        benchmark: A merged benchmark.
        scores: Scores of (at least) the query set's images against the training set.
        query_set: ``"heldout"`` or ``"generated"``.
        part: ``"reported"``: the queries outside the calibration split (all of them when the
            benchmark has none); ``"calibration"``: only those kept for choosing settings;
            ``"all"``: both.
        n_bootstrap: Resamples of the subsets for the interval.
        seed: Seed of the resampling.

    Raises:
        ConfigError: ``part`` is unknown, or ``"calibration"`` on a benchmark without that split.
        DataError: The scores' training ids or query ids are not the benchmark's.
        BenchmarkError: The benchmark is not merged.
    """
    benchmark._check_query_set(query_set)
    if part not in get_args(QueryPart):
        raise ConfigError(f"part={part!r} is invalid: expected one of {list(get_args(QueryPart))}")
    truth = benchmark.ground_truth(query_set)
    queries = benchmark.queries[query_set]
    calibration = np.isin(queries.ids, benchmark.calibration_ids(query_set))
    if part == "calibration" and not calibration.any():
        raise ConfigError(f"{benchmark.path} keeps no calibration queries")
    keep = {"reported": ~calibration, "calibration": calibration}.get(
        part, np.ones_like(calibration)
    )
    truth = truth[..., keep]
    columns = _match_ids(scores.train_ids, benchmark.train_ids, "training", benchmark.path)
    rows = _match_ids(scores.query_ids, queries.ids, f"{query_set} query", benchmark.path)
    values = np.asarray(scores.values, dtype=np.float64)[rows[keep]][:, columns]
    lds, ci, per_query = lds_from_arrays(
        benchmark.masks, truth.mean(axis=(1, 2)), values, n_bootstrap=n_bootstrap, seed=seed
    )
    split_half, ceiling, basis = noise_ceiling(truth)
    return LDSResult(
        method=scores.method,
        query_set=query_set,
        lds=lds,
        ci=ci,
        per_query=per_query,
        split_half=split_half,
        ceiling=ceiling,
        ceiling_basis=basis,
        n_subsets=len(benchmark.masks),
        settings=dict(scores.settings),
    )


def _match_ids(have: np.ndarray, want: np.ndarray, what: str, where: Path) -> np.ndarray:
    """Indices into ``have`` that give ``want``'s order; the two must be the same id set."""
    have = np.asarray(have, dtype=np.int64)
    position = {int(i): n for n, i in enumerate(have)}
    missing = [int(i) for i in want if int(i) not in position]
    extra = len(set(position) - {int(i) for i in want})
    if missing or extra:
        raise DataError(
            f"the scores' {what} ids do not match the benchmark {where}: {len(missing)} of its "
            f"{len(want)} ids are missing from the scores (e.g. {missing[:3]}) and the scores have "
            f"{extra} ids it does not; score the benchmark's own images"
        )
    return np.array([position[int(i)] for i in want], dtype=np.int64)
