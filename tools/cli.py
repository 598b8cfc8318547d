"""The ``hant`` command line: ``hant SUBCOMMAND ...``.

Each subcommand lives in its own module ``hant.tools.cmd_<name>`` that exposes
``add_parser(subparsers)``; that function adds its parser and sets ``func`` (a callable
``func(args) -> int`` exit code) with ``set_defaults``. To add a subcommand, write the module
and add one line to :data:`SUBCOMMANDS`.

Exit codes: 0 success, 2 a usage error or any :class:`hant.HantError` (its message on
stderr, no traceback), 1 the reader of stdout went away (a closed pipe), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hant import __version__
from hant.errors import HantError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = (
    "hant.tools.cmd_inspect",
    "hant.tools.cmd_profile",
    "hant.tools.cmd_fit",
    "hant.tools.cmd_eval_cost",
    "hant.tools.cmd_substitute",
    "hant.tools.cmd_optimize",
    "hant.tools.cmd_diff",
    "hant.tools.cmd_demo",
    "hant.tools.cmd_linearize",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`SUBCOMMANDS` added."""
    parser = argparse.ArgumentParser(
        prog="hant",
        description="Hardware-aware network transformation: inspect and rewrite PyTorch graphs.",
    )
    parser.add_argument("--version", action="version", version=f"hant {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hant`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed what to say
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except HantError as exc:
        print(f"hant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (hant inspect | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 1
