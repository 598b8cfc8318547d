"""``hant demo``: the main job end to end on the bundled digits task (see :mod:`hant.tools.demo`)."""

from __future__ import annotations

import argparse

from hant.errors import InputError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo", help="train the digits teacher and make it faster: exact passes, substitution, "
                     "nonlinearity removal, fine-tuning, ONNX; every number measured",
        description="Train (or load) the bundled digits MobileNetV2-like teacher, inspect it, run the exact passes, "
                    "operator substitution under a latency budget (measured with onnxruntime), nonlinearity "
                    "removal and fine-tuning, export ONNX and check it; print latency, accuracy and error at each "
                    "step and write report.md, pareto.png, graph_before/after.svg and model.onnx to --out. "
                    "Rerun to resume.")
    parser.add_argument("--out", default="hant-demo", help="output folder (default hant-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a minimal run for CI: roofline pricing, a few distillation and fine-tuning steps")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo; an unwritable --out is a usage error."""
    from hant.tools.demo import DEFAULT, QUICK, run_demo

    try:
        run_demo(args.out, QUICK if args.quick else DEFAULT)
    except OSError as exc:
        raise InputError(f"cannot write the demo output to {args.out!r}: {exc.strerror or exc}") from exc
    return 0
