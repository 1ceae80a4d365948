"""Attribution methods on one API: ``method.fit(train_stores).score(query_stores) -> Scores``."""

from diffattr.errors import UnknownMethodError
from diffattr.methods._attribute import attribute
from diffattr.methods._base import AttributionMethod
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
from diffattr.methods._nda import NDAConfig, nda_heatmaps, nda_scores, save_heatmap
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

#: Registry: method name -> class.
METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (DAS, DTRAK, TRAK, TracIn, ReTrac, GradDot, GradCos)
}


def get_method(name: str) -> type[AttributionMethod]:
    """Return the method class registered as ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of {sorted(METHODS)}"
        ) from None


__all__ = [
    "DAS",
    "DTRAK",
    "METHODS",
    "SIGN_CONVENTION",
    "TRAK",
    "AttributionMethod",
    "DASConfig",
    "DTRAKConfig",
    "GradCos",
    "GradDot",
    "GradSimConfig",
    "KernelConfig",
    "NDAConfig",
    "ReTrac",
    "Scores",
    "TRAKConfig",
    "TracIn",
    "TracInConfig",
    "attribute",
    "embedding_cosine_scores",
    "fit_kernel",
    "get_method",
    "nda_heatmaps",
    "nda_scores",
    "pixel_cosine_scores",
    "random_scores",
    "save_heatmap",
]
