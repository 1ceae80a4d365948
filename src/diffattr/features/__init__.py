"""The feature engine: plans, per-sample gradients, projections, resumable stores, featurisation."""

from diffattr.features._distributed import Distributed, ShardedStore, featurize_sharded
from diffattr.features._engine import FeatureConfig, featurize
from diffattr.features._factored import FactoredBatch, FactoredGradientComputer
from diffattr.features._gradients import GradientComputer, select_parameters
from diffattr.features._kronecker import KroneckerLayout, KroneckerProjector
from diffattr.features._outputs import OutputConfig
from diffattr.features._plan import Plan, PlanConfig
from diffattr.features._planner import (
    BackendChoice,
    FeaturePlanEstimate,
    choose_backend,
    estimate_featurization,
)
from diffattr.features._projection import ProjectionConfig, Projector, make_projector
from diffattr.features._store import FeatureStore

__all__ = [
    "BackendChoice",
    "Distributed",
    "FactoredBatch",
    "FactoredGradientComputer",
    "FeatureConfig",
    "FeaturePlanEstimate",
    "FeatureStore",
    "GradientComputer",
    "KroneckerLayout",
    "KroneckerProjector",
    "OutputConfig",
    "Plan",
    "PlanConfig",
    "ProjectionConfig",
    "Projector",
    "ShardedStore",
    "choose_backend",
    "estimate_featurization",
    "featurize",
    "featurize_sharded",
    "make_projector",
    "select_parameters",
]
