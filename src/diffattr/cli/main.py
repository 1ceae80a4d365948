"""The ``diffattr`` command: a thin layer over the public API.

Exit status: 0 on success, 1 with a one-line message for bad input (any ``DiffattrError``) or
a file that cannot be read or written (any ``OSError``; ``--debug`` shows the traceback for
both), 2 for usage errors. Output cut short by its reader (``diffattr info m | head``) ends
quietly with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diffattr._version import __version__
from diffattr.cli import _attribute, _demo, _info, _lds, _plan, _report, _sample, _train
from diffattr.errors import DiffattrError


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``diffattr`` command."""
    parser = argparse.ArgumentParser(
        prog="diffattr",
        description="Training-data attribution for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffattr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command's module registers its parser; this order is the order of `diffattr --help`.
    _train.add_parser(commands)
    _sample.add_parser(commands)
    _info.add_parser(commands)
    _attribute.add_parser(commands)
    _lds.add_parser(commands)
    _report.add_parser(commands)
    _lds.add_counterfactual_parser(commands)
    _plan.add_parser(commands)
    _info.add_models_parser(commands)
    _demo.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
        # Flushed here, so that a reader that has gone (`| head`) is noticed while it can be
        # handled, not by the interpreter's last flush, which prints a traceback.
        sys.stdout.flush()
    except BrokenPipeError:
        # As the Python docs recommend: nothing more can be shown, so send the rest of the
        # output to devnull, where the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except DiffattrError as err:
        if args.debug:
            raise
        print(f"diffattr: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if args.debug:
            raise
        print(f"diffattr: error: {_os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "diffattr: interrupted (finished checkpoints are kept; rerun to resume)",
            file=sys.stderr,
        )
        return 130
    return 0


def _os_error_message(err: OSError) -> str:
    """``path: reason``, rather than the ``[Errno 13] Permission denied: 'path'`` of str()."""
    if err.filename is None:
        return str(err)
    where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else err.filename
    return f"{where}: {err.strerror or err}"


if __name__ == "__main__":
    sys.exit(main())
