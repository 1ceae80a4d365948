"""The ``diffattr`` command-line interface."""

from diffattr.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
