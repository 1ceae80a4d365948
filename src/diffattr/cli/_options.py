"""Command-line options generated from the settings dataclasses, so help text lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from diffattr.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def positive_int(text: str) -> int:
    """An argparse type for counts of at least 1.

    Checked at the edge: a negative count would otherwise reach a slice such as ``ids[:n]``
    and quietly mean "all but the last n".
    """
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type for counts where 0 means none."""
    return _count(text, 0)


def _count(text: str, least: int) -> int:
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


#: The command line's feature options: flag -> the FeatureConfig field it sets (a path through
#: the nested settings). Defaults, types, choices and help all come from the dataclasses.
FEATURE_OPTIONS: dict[str, tuple[str, ...]] = {
    "timesteps": ("plan", "num_steps"),
    "plan": ("plan", "strategy"),
    "noise": ("plan", "noise"),
    "plan-seed": ("plan", "seed"),
    "backend": ("backend",),
    "projection": ("projection", "kind"),
    "proj-dim": ("projection", "dim"),
    "proj-distribution": ("projection", "distribution"),
    "proj-seed": ("projection", "seed"),
    "factored-dim": ("projection", "factored_dim"),
    "max-memory-mb": ("projection", "max_memory_mb"),
    "precision": ("dtype",),
    "storage": ("storage",),
    "mixed-precision": ("mixed_precision",),
}


def _field_of(path: tuple[str, ...]) -> tuple[dataclasses.Field[Any], Any, Any]:
    """The dataclass field a FEATURE_OPTIONS path names, its type hint and its default."""
    from diffattr.features import FeatureConfig

    owner: Any = FeatureConfig()
    for name in path[:-1]:
        owner = getattr(owner, name)
    field = {f.name: f for f in dataclasses.fields(owner)}[path[-1]]
    return field, typing.get_type_hints(type(owner))[path[-1]], getattr(owner, path[-1])


def add_feature_options(parser: Any, only: tuple[str, ...] | None = None) -> None:
    """Add ``FEATURE_OPTIONS`` (or ``only`` those flags), generated from ``FeatureConfig()``.

    The defaults are those of a default ``FeatureConfig``, so the command line and the
    library never disagree (:func:`features_from_args` builds the settings back).
    """
    for flag in only or tuple(FEATURE_OPTIONS):
        field, hint, default = _field_of(FEATURE_OPTIONS[flag])
        parse = _parser_for(hint)
        help_text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        parser.add_argument(
            f"--{flag}",
            dest=flag.replace("-", "_"),
            type=parse,
            default=default,
            help=help_text,
            metavar=parse.__name__.upper(),
        )


def features_from_args(args: argparse.Namespace) -> Any:
    """The ``FeatureConfig`` the feature options (and ``--parameters``) describe."""
    from diffattr.features import FeatureConfig

    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for flag, path in FEATURE_OPTIONS.items():
        dest = flag.replace("-", "_")
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    parameters = getattr(args, "parameters", None)
    base = FeatureConfig()
    for name, values in nested.items():
        top[name] = dataclasses.replace(getattr(base, name), **values)
    return dataclasses.replace(base, **top, parameters=tuple(parameters) if parameters else None)


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``, for every command that builds a model from a checkpoint."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow checkpoints whose model is an importable module:factory: building it runs "
        "that module's code, so only for checkpoints whose author you trust (registry models "
        "need no trust; see docs/trust.md)",
    )


def add_dataclass_options(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> list[str]:
    """Add one ``--option`` per scalar field of ``cls``, typed, with the field's ``help``.

    Optional fields (``float | None``) accept ``none``; booleans accept true/false; Literal
    fields list their choices. Options default to ``None`` so that only what the user typed
    overrides the dataclass defaults (see :func:`dataclass_from_args`). Fields of other types
    (tuples, nested settings) and those in ``skip`` get no option.

    Returns:
        The names of the fields that got an option.
    """
    group = parser.add_argument_group(f"{cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    added = []
    existing = {a.dest for a in parser._actions}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        parse = _parser_for(hint)
        if parse is None or field.name in skip or field.name in existing:
            continue
        default = field.default
        # argparse formats help with %, so a literal percent sign must be doubled.
        help_text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=parse,
            default=None,
            help=help_text,
            metavar=parse.__name__.upper(),
        )
        added.append(field.name)
    return added


def dataclass_from_args(cls: type, args: argparse.Namespace, **base: Any) -> Any:
    """Build ``cls`` from the parsed options, keeping defaults (or ``base``) for untyped ones.

    Fields given in ``base`` are taken from it, never from an option of the same name (which
    may belong to another setting, as ``--timesteps`` does).
    """
    values = dict(base)
    for field in dataclasses.fields(cls):
        if field.name in base:
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = None if value is _NONE else value
    return cls(**values)


def given_options(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    """The options that were given or have a default, by name, with an explicit ``none`` as None.

    Options left unset (None) and those in ``skip`` are left out.
    """
    return {
        name: None if value is _NONE else value
        for name, value in sorted(vars(args).items())
        if name not in skip and value is not None
    }


def reject_foreign_options(
    args: argparse.Namespace, names: list[str], cls: type, what: str
) -> None:
    """Raise ConfigError for options that were given but are not fields of ``cls``."""
    own = {field.name for field in dataclasses.fields(cls)}
    given = sorted(n for n in names if getattr(args, n, None) is not None and n not in own)
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        verb = "does" if len(given) == 1 else "do"
        raise ConfigError(f"{flags} {verb} not apply to {what}")


_NONE = object()


def _parser_for(hint: Any) -> Any:
    # `int | None` is a types.UnionType; `Literal[...] | None` is a typing.Union.
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    optional = union and type(None) in typing.get_args(hint)
    if union:
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) != 1:
            return None
        hint = rest[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = [str(c) for c in typing.get_args(hint)]

        def parse_choice(text: str) -> Any:
            if optional and text.lower() == "none":
                return _NONE
            if text not in choices:
                raise argparse.ArgumentTypeError(f"choose one of {choices}, got {text!r}")
            return text

        parse_choice.__name__ = "|".join(choices)
        return parse_choice
    if hint not in (int, float, str, bool):
        return None

    def parse_scalar(text: str) -> Any:
        if optional and text.lower() == "none":
            return _NONE
        if hint is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        try:
            return hint(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {hint.__name__}, got {text!r}") from None

    parse_scalar.__name__ = hint.__name__
    return parse_scalar
