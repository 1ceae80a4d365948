"""Command-line options generated from the settings dataclasses, so help text lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one ``--option`` per field of ``cls``, typed, with the field's ``help`` metadata.

    Optional fields (``float | None``) accept ``none``. Options default to ``None`` so that only
    what the user typed overrides the dataclass defaults (see :func:`dataclass_from_args`).
    """
    group = parser.add_argument_group(f"{cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _scalar_type(hints[field.name])
        default = field.default
        # argparse formats help with %, so a literal percent sign must be doubled.
        help_text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        group.add_argument(
            f"--{prefix}{field.name.replace('_', '-')}",
            dest=f"{prefix}{field.name}",
            type=_parser_for(kind, optional=_is_optional(hints[field.name])),
            default=None,
            help=help_text,
            metavar=kind.__name__.upper(),
        )


def dataclass_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", **base: Any
) -> Any:
    """Build ``cls`` from the parsed options, keeping defaults (or ``base``) for untyped ones."""
    values = dict(base)
    for field in dataclasses.fields(cls):
        value = getattr(args, f"{prefix}{field.name}", None)
        if value is not None:
            values[field.name] = None if value is _NONE else value
    return cls(**values)


_NONE = object()


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _scalar_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _parser_for(kind: type, *, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return _NONE
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse
