"""``hant substitute MODEL``: HANT operator substitution from the shell."""

from __future__ import annotations

import argparse

from hant.errors import InputError
from hant.tools.datasets import DATA_HELP, load_task
from hant.tools.models import add_model_arguments, model_and_inputs

__all__ = ["add_parser", "run"]


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1.5 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions of the teacher's latency, e.g. 0.4,0.6,1.0; got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``substitute`` subcommand."""
    parser = subparsers.add_parser(
        "substitute", help="replace slow blocks by distilled faster ones under a latency budget (HANT)",
        description="Distil a pool of candidate ops per site of MODEL on --data, then choose one per site by an "
                    "integer program for every budget (fractions of the teacher's latency under --cost). "
                    "The run directory keeps finished work: rerun the same command to resume.")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--budgets", type=_budgets, default=[0.5], metavar="B,B,...",
                        help="latency budgets as fractions of the teacher's (default 0.5); the student written "
                             "to --out is for the first")
    parser.add_argument("--cost", default="roofline:cpu", metavar="SPEC", help="cost model of the target")
    parser.add_argument("--measure", default="measured:cpu-onnxruntime", metavar="SPEC",
                        help="cost model that times the students for real (default measured:cpu-onnxruntime); "
                             "'none' to skip")
    parser.add_argument("--candidates", metavar="FAMILY,...",
                        help="candidate families (identity, conv, dws, ir, fmb, resnet, svd); default all")
    parser.add_argument("--activations", metavar="ACT,...",
                        help="activation choices of the candidates (relu, hswish, silu); default all")
    parser.add_argument("--select", metavar="PATTERN,...",
                        help="keep only candidates whose name matches one of these shell patterns, e.g. "
                             "'identity,conv_k1_*,ir_k3_e[12]_relu'")
    parser.add_argument("--score", choices=["distill", "replace_one"], default="distill",
                        help="what the integer program minimises: the distillation loss per site, or LANA's "
                             "replace-one score (how far the teacher's output moves with only that site swapped)")
    parser.add_argument("--keep-dominated", action="store_true",
                        help="also distil candidates priced no faster than the teacher's block (never chosen "
                             "under a latency budget; skipped by default)")
    parser.add_argument("--sites", metavar="MODULE,...", help="module paths to substitute (default: natural blocks)")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per candidate (default 200)")
    parser.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate (AdamW, cosine)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches captured from --data; 0: all")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tune every budget's student this many epochs with KD from the teacher")
    parser.add_argument("--run-dir", default="hant-substitute", help="where finished jobs persist")
    parser.add_argument("--out", help="write the student: .onnx, .pt or .pt2")
    parser.add_argument("--plot", help="write a PNG of predicted latency against accuracy for every budget")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from hant.passes.substitute import substitute
    from hant.tools.models import save_module

    if args.steps < 1:
        raise InputError("--steps must be at least 1")
    if args.calibration_batches < 0 or args.finetune_epochs < 0:
        raise InputError("--calibration-batches and --finetune-epochs must not be negative")
    loaded, inputs = model_and_inputs(args)
    task = load_task(args.data)
    result = substitute(
        loaded.module, inputs, task.train, budget=args.budgets[0], budgets=args.budgets, cost=args.cost,
        candidates=args.candidates.split(",") if args.candidates else None,
        activations=args.activations.split(",") if args.activations else None,
        select=args.select.split(",") if args.select else None, score=args.score,
        prune_dominated=not args.keep_dominated,
        sites=args.sites.split(",") if args.sites else None, run_dir=args.run_dir, steps=args.steps, lr=args.lr,
        calibration_batches=args.calibration_batches or None, finetune_epochs=args.finetune_epochs,
        evaluate=task.evaluate, measure=None if args.measure == "none" else args.measure)
    if result is None:     # a torchrun rank other than 0: its share is done
        return 0
    print(result.report())
    print()
    print(result.pareto_table())
    if args.plot:
        from hant.tools.plots import pareto_plot
        pareto_plot(result.solutions, args.plot)
        print(f"wrote {args.plot}")
    if args.out:
        print(f"wrote {save_module(result.student, inputs, args.out)}")
    return 0
