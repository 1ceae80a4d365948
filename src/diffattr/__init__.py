"""diffattr: which training images made a diffusion model produce this image?

Subpackages, each depending only on those before it: ``data`` (datasets, splits, image files),
``models`` (registry, training, sampling, checkpoints), ``evaluation`` (sample quality, LDS),
``cli`` (the ``diffattr`` command).
"""

from diffattr._version import __version__
from diffattr.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DiffattrError,
    UnknownModelError,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiffattrError",
    "UnknownModelError",
    "__version__",
]
