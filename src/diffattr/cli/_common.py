"""What several commands share: the lock on ``--out``, ``--device``/``--quiet``, number lists."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import Any

from diffattr._io import output_lock

#: A subcommand: what ``set_defaults(run=...)`` names.
Command = Callable[[argparse.Namespace], None]


def locking_out(command: Command) -> Command:
    """Run ``command`` holding the lock on its ``--out`` directory (see :func:`output_lock`).

    The lock is taken before anything else, so an output that cannot be written is refused
    before any work, and a second process writing the same directory is refused outright.
    Under torchrun only rank 0 takes it: the other ranks write into the directory it holds.
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        if int(os.environ.get("RANK", "0")) > 0:
            command(args)
            return
        with output_lock(args.out):
            command(args)

    return run


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--quiet``, for every command that computes."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _number_list(parse: type, what: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for comma-separated ``what`` (``parse`` applied to each part)."""

    def parse_list(text: str) -> tuple[Any, ...]:
        try:
            return tuple(parse(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse_list


#: argparse types for comma-separated integers and numbers.
int_list = _number_list(int, "integers")
float_list = _number_list(float, "numbers")
