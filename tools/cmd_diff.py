"""``hant diff A B``: per-node costs and the regions that changed, before (A) against after (B)."""

from __future__ import annotations

import argparse
import warnings

from hant.cost_models import get as get_cost_model
from hant.errors import InputError
from hant.graphs.draw import draw
from hant.tools.diff import compare, latency_shares
from hant.tools.models import MODEL_SPEC_HELP, load_model, make_inputs, parse_shape, trace_for_cli

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``diff`` subcommand."""
    parser = subparsers.add_parser(
        "diff", help="compare two models node by node: costs and the regions that changed",
        description="Trace A and B on the same random inputs, price both with --cost, and print the nodes that "
                    "changed (matched by name), the module regions that changed and the total latencies. "
                    f"A and B are model specs: {MODEL_SPEC_HELP}")
    parser.add_argument("before", metavar="A", help="the model before (e.g. torchvision:resnet18 or before.pt)")
    parser.add_argument("after", metavar="B", help="the model after (e.g. optimized.pt or optimized.pt2)")
    parser.add_argument("--input", action="append", metavar="SHAPE", dest="input_shapes",
                        help="example input shape (default: the shapes the models are known to take)")
    parser.add_argument("--cost", default="roofline:cpu", metavar="SPEC", help="cost-model spec (default roofline:cpu)")
    parser.add_argument("--all", action="store_true", help="list every node, not only those that changed")
    parser.add_argument("--depth", type=int, default=2, help="module-path levels that name a region (default 2)")
    parser.add_argument("--dot", nargs=2, metavar=("BEFORE.svg", "AFTER.svg"),
                        help="also draw both graphs, nodes coloured by their share of latency (DOT text without "
                             "Graphviz)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load and trace both models, print the diff, draw the graphs when asked."""
    if args.depth < 1:
        raise InputError("--depth must be at least 1")
    cost = get_cost_model(args.cost)
    shapes = tuple(parse_shape(s) for s in args.input_shapes) if args.input_shapes else None
    before, after = load_model(args.before), load_model(args.after)
    shapes = shapes or before.input_shapes or after.input_shapes
    if shapes is None:
        raise InputError("neither model says what input it takes: add --input, e.g. --input 1,3,224,224")
    inputs = make_inputs(shapes)
    gm_a, gm_b = trace_for_cli(before.module, inputs), trace_for_cli(after.module, inputs)
    result = compare(gm_a, gm_b, cost, depth=args.depth)
    print(f"{before.name} -> {after.name}")
    print(result.table(all_nodes=args.all))
    if args.dot:
        for gm, path in zip((gm_a, gm_b), args.dot):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                written = draw(gm, path, shares=latency_shares(cost.graph_cost(gm)))
            note = " (Graphviz 'dot' not installed: DOT text)" if caught else ""
            print(f"wrote {written}{note}")
    return 0
