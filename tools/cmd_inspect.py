"""``hant inspect MODEL``: trace a model and print where its time goes, node by node."""

from __future__ import annotations

import argparse
import sys
import warnings

from hant.cost_models import available, get
from hant.errors import InputError
from hant.tools.models import add_model_arguments, model_and_inputs, positive_int, trace_for_cli
from hant.tools.report import FORMATS, inspect, inspect_rows

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand."""
    parser = subparsers.add_parser(
        "inspect", help="per-node cost table of a model (shapes, MACs, bytes, latency)",
        description="Trace MODEL on random inputs and print one row per compute node: shapes, params, MACs, "
                    "bytes, arithmetic intensity, latency and share of the total, under a cost model.",
    )
    add_model_arguments(parser)
    parser.add_argument("--cost", default="roofline:cpu", metavar="SPEC",
                        help=f"cost-model spec, PREFIX or PREFIX:ARGUMENT (default roofline:cpu); prefixes: "
                             f"{', '.join(available()) or 'none'}")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--top", type=positive_int, metavar="N", help="show only the N slowest nodes")
    parser.add_argument("--dot", metavar="PATH",
                        help="also draw the graph, nodes coloured by latency share: PATH.dot gets DOT text; "
                             "PATH.svg is rendered by graphviz (DOT text beside it when graphviz is missing)")
    parser.set_defaults(func=run)
    return parser


def _draw(gm, cost_model, path: str) -> None:
    from hant.graphs.draw import draw

    rows, report = inspect_rows(gm, cost_model)
    total_s = report.total.latency_s
    shares = {r.node: r.cost.latency_s / total_s for r in rows} if total_s else {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = draw(gm, path, shares=shares)
    except OSError as exc:
        raise InputError(f"cannot write the graph to {path!r}: {exc.strerror or exc}") from exc
    for warning in caught:  # e.g. no graphviz, so DOT text instead of SVG
        print(f"hant inspect: note: {warning.message}", file=sys.stderr)
    print(f"wrote {written}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Load, trace, cost and print; draw the graph when ``--dot`` is given."""
    cost_model = get(args.cost)  # an unknown spec fails before any model loads
    loaded, inputs = model_and_inputs(args)
    gm = trace_for_cli(loaded.module, inputs)
    print(inspect(gm, cost_model, top=args.top, format=args.format))
    if args.dot:
        _draw(gm, cost_model, args.dot)
    return 0
