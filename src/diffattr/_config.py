from dataclasses import fields
from typing import Any

import numpy as np

from diffattr.errors import ConfigError


def known_fields(cls: type, data: object) -> dict[str, Any]:
    """Check that ``data`` is a dict of ``cls``'s dataclass fields; return a copy for ``cls(**)``.

    The shared half of every settings class's ``from_dict``: unknown keys are an error naming
    them and the known ones, never silently dropped.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} settings must be a dict, got {data!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {unknown}; known: {sorted(names)}")
    return dict(data)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer setting: Python or numpy ints, but not bools."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_fields(settings: object, checks: dict[str, bool], allowed: dict[str, str]) -> None:
    """Raise ConfigError for the first field of ``settings`` whose check failed.

    The shared half of every settings class's validation: the message names the class, the
    field, its value and what it must be (``allowed[name]``).
    """
    for name, ok in checks.items():
        if not ok:
            value = getattr(settings, name)
            raise ConfigError(
                f"{type(settings).__name__}.{name}={value!r} is invalid: must be {allowed[name]}"
            )
