"""Attribution methods on one API: ``method.fit(train_stores).score(query_stores) -> Scores``."""

from diffattr.errors import UnknownMethodError
from diffattr.methods._attribute import attribute
from diffattr.methods._base import AttributionMethod, Method, ModelFreeMethod
from diffattr.methods._curvature import EKFAC, KFAC, InfluenceConfig
from diffattr.methods._journey import JourneyTRAK, JourneyTRAKConfig, StepScores
from diffattr.methods._kernel import (
    DAS,
    DTRAK,
    TRAK,
    DASConfig,
    DTRAKConfig,
    KernelConfig,
    TRAKConfig,
    fit_kernel,
)
from diffattr.methods._model_free import NDA, PixelCosine, PixelCosineConfig, Random, RandomConfig
from diffattr.methods._nda import NDAConfig, nda_heatmaps, nda_scores
from diffattr.methods._run import Attribution, RunLayout, read_run, record_run
from diffattr.methods._scores import SIGN_CONVENTION, Scores
from diffattr.methods._similarity import (
    embedding_cosine_scores,
    pixel_cosine_scores,
    random_scores,
)
from diffattr.methods._tracin import (
    GradCos,
    GradDot,
    GradSimConfig,
    ReTrac,
    TracIn,
    TracInConfig,
)
from diffattr.methods._unlearn import Unlearn, UnlearnConfig

#: Registry: method name -> class, gradient and model-free alike.
METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        DAS,
        DTRAK,
        TRAK,
        TracIn,
        ReTrac,
        GradDot,
        GradCos,
        KFAC,
        EKFAC,
        JourneyTRAK,
        NDA,
        PixelCosine,
        Random,
        Unlearn,
    )
}


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name`` (e.g. ``"das"``, ``"nda"``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of {sorted(METHODS)}"
        ) from None


__all__ = [
    "DAS",
    "DTRAK",
    "EKFAC",
    "KFAC",
    "METHODS",
    "NDA",
    "SIGN_CONVENTION",
    "TRAK",
    "Attribution",
    "AttributionMethod",
    "DASConfig",
    "DTRAKConfig",
    "GradCos",
    "GradDot",
    "GradSimConfig",
    "InfluenceConfig",
    "JourneyTRAK",
    "JourneyTRAKConfig",
    "KernelConfig",
    "Method",
    "ModelFreeMethod",
    "NDAConfig",
    "PixelCosine",
    "PixelCosineConfig",
    "Random",
    "RandomConfig",
    "ReTrac",
    "RunLayout",
    "Scores",
    "StepScores",
    "TRAKConfig",
    "TracIn",
    "TracInConfig",
    "Unlearn",
    "UnlearnConfig",
    "attribute",
    "embedding_cosine_scores",
    "fit_kernel",
    "get_method",
    "nda_heatmaps",
    "nda_scores",
    "pixel_cosine_scores",
    "random_scores",
    "read_run",
    "record_run",
]
