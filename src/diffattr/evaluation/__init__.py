"""Evaluation: sample quality, the linear datamodeling score (LDS) and counterfactual retraining."""

from diffattr.evaluation._counterfactual import (
    CounterfactualConfig,
    CounterfactualResult,
    counterfactual,
)
from diffattr.evaluation._lds import (
    LDSBenchmark,
    LDSConfig,
    QueryPart,
    draw_masks,
    query_losses,
    truth_plans,
)
from diffattr.evaluation._lds_score import LDSResult, lds_score
from diffattr.evaluation._metric import lds_from_arrays, noise_ceiling, spearman_columns
from diffattr.evaluation._quality import ClassConfidence
from diffattr.evaluation._retrain import recorded_init, recorded_recipe, retrain_like

__all__ = [
    "ClassConfidence",
    "CounterfactualConfig",
    "CounterfactualResult",
    "LDSBenchmark",
    "LDSConfig",
    "LDSResult",
    "QueryPart",
    "counterfactual",
    "draw_masks",
    "lds_from_arrays",
    "lds_score",
    "noise_ceiling",
    "query_losses",
    "recorded_init",
    "recorded_recipe",
    "retrain_like",
    "spearman_columns",
    "truth_plans",
]
