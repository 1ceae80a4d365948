"""Domain errors raised by diffattr.

Every error a user can cause derives from :class:`DiffattrError`, and each subclasses the nearest
built-in too, so callers may catch either the specific error or the generic one. The CLI turns any
``DiffattrError`` into a one-line message and exit status 1.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiffattrError",
    "OutputError",
    "ReportError",
    "StoreCorruptError",
    "StoreError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "UnknownMethodError",
    "UnknownModelError",
]


class DiffattrError(Exception):
    """Base class of every error diffattr raises for bad input or bad state."""


class ConfigError(DiffattrError, ValueError):
    """A setting is invalid; the message names the field, the value and what is allowed."""


class DataError(DiffattrError, ValueError):
    """Input images are missing, unreadable or malformed; the message names the file or index."""


class CheckpointError(DiffattrError, OSError):
    """A checkpoint is missing, incomplete, corrupted or does not match the requested run."""


class _PlainKeyError(DiffattrError, KeyError):
    def __str__(self) -> str:
        # KeyError quotes its argument; a plain message reads better on the command line.
        return str(self.args[0]) if self.args else ""


class UnknownModelError(_PlainKeyError):
    """A model name is not in the registry and is not an importable ``module:factory`` path."""


class UnknownMethodError(_PlainKeyError):
    """An attribution method name is not in the registry."""


class StoreError(DiffattrError, OSError):
    """A feature store is missing or cannot be used."""


class StoreMismatchError(StoreError):
    """A store was made with other settings, samples or arrays than the ones asked for."""


class StoreIncompleteError(StoreError):
    """A store's featurisation has not finished; rerunning it resumes where it stopped."""


class StoreCorruptError(StoreError):
    """A store's files are truncated, altered or unreadable."""


class BenchmarkError(DiffattrError, OSError):
    """An LDS benchmark is missing pieces, of another format, or does not match its inputs."""


class OutputError(DiffattrError, OSError):
    """An output path cannot be created or written, or another diffattr process is writing it."""


class ReportError(DiffattrError, ValueError):
    """A run directory lacks what a report needs, or its scores and images do not match."""
