"""``hant optimize MODEL --input SHAPE --passes exact --out FILE``: rewrite a model, prove it, save it.

The model is traced on random inputs of the given shape, the passes run to a fixed point
under the PassManager (every exact pass checked on those inputs, rolled back when it breaks
numerics), the report table is printed, and the result is written in the format the
``--out`` suffix names: ``.onnx`` (exported, simplified and checked with onnxruntime),
``.pt`` (``torch.save`` of the module) or ``.pt2`` (a ``torch.export`` program).

``--passes all`` is the exact preset, then the lossy ``remove_nonlinearity`` (latency target
``--budget``, a fraction of the folded latency, calibrated on ``--data``), then the exact
preset again; a comma list may name ``remove_nonlinearity`` among exact passes. Lossy passes
need ``--data``; their output drift is reported (and accuracy, when the data has labels).
"""

from __future__ import annotations

import argparse
import os

import torch

from hant.cost_models import available as available_costs
from hant.cost_models import get as get_cost_model
from hant.errors import InputError
from hant.passes import PRESETS, PassManager, available, resolve
from hant.passes.manager import compare_outputs
from hant.tools.datasets import DATA_HELP, load_task
from hant.tools.models import (
    OUTPUT_SUFFIXES, add_model_arguments, model_and_inputs, save_module, trace_for_cli,
)

__all__ = ["add_parser", "run"]

LOSSY = ("remove_nonlinearity",)


def _segments(spec: str) -> list[str]:
    """``spec`` cut into runs of PassManager passes and single lossy pass names, in order."""
    names = ["exact", "remove_nonlinearity", "exact"] if spec.strip() == "all" else \
        [n.strip() for n in spec.split(",") if n.strip()]
    segments: list[str] = []
    for name in names:
        if name in LOSSY or not segments or segments[-1] in LOSSY:
            segments.append(name)
        else:
            segments[-1] += f",{name}"
    return segments


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``optimize`` subcommand."""
    parser = subparsers.add_parser(
        "optimize", help="rewrite a model with passes (exact: BN folding, linear folding, fusion; all: also lossy "
                         "remove_nonlinearity on --data) and save it",
        description="Trace MODEL, run the passes with a numeric check on random inputs (a pass that breaks "
                    "numerics is rolled back), print the report and write the result; the --out suffix picks "
                    "the format: .onnx, .pt (torch.save of the module) or .pt2 (torch.export).",
    )
    add_model_arguments(parser)
    parser.add_argument("--passes", default="exact", metavar="LIST",
                        help=f"a preset ({', '.join(sorted(PRESETS))}), 'all' (exact, remove_nonlinearity, exact; "
                             f"needs --data) or a comma list of passes ({', '.join(available())}); default exact")
    parser.add_argument("--budget", type=float, default=0.7, metavar="FRACTION",
                        help="latency target of the lossy passes, a fraction of the latency before them "
                             "(default 0.7)")
    parser.add_argument("--data", metavar="DATA", help=f"calibration data for the lossy passes: {DATA_HELP}")
    parser.add_argument("--cost", default="roofline:cpu", metavar="SPEC",
                        help=f"cost-model spec (default roofline:cpu); prefixes: {', '.join(available_costs())}")
    parser.add_argument("--out", metavar="FILE", help="where to write the result: FILE.onnx, FILE.pt or FILE.pt2")
    parser.add_argument("--report", metavar="FILE.md", help="also write the report as a markdown file")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the check (default 1e-4)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check (default 1e-5)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load, trace, optimize, print the report, write the outputs."""
    if args.out and not args.out.endswith(OUTPUT_SUFFIXES):
        raise InputError(f"--out {args.out!r}: the suffix picks the format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    for path in (args.out, args.report):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise InputError(f"cannot write {path!r}: folder {folder!r} does not exist")
    segments = _segments(args.passes)
    for segment in segments:
        if segment not in LOSSY:
            resolve(segment)                 # unknown names fail before any model loads
    get_cost_model(args.cost)
    lossy = [s for s in segments if s in LOSSY]
    if lossy and not args.data:
        raise InputError(f"--passes {args.passes} includes lossy {', '.join(lossy)}: give --data (e.g. --data digits)")
    if lossy and not 0 < args.budget <= 1:
        raise InputError(f"--budget is a fraction of the latency (0 < budget <= 1), got {args.budget}")
    loaded, inputs = model_and_inputs(args)
    task = load_task(args.data) if lossy else None
    gm = current = trace_for_cli(loaded.module, inputs)
    sections, first_cost = [], None
    for segment in segments:
        if segment in LOSSY:
            from hant.passes.remove_nonlinearity import linearize

            calib = [b for _, b in zip(range(8), task.train)]
            lossy_result = linearize(current, inputs, calib, latency_target=args.budget, cost=args.cost)
            print(lossy_result.report)
            sections.append(lossy_result.report.to_markdown())
            current = lossy_result.module
            continue
        manager = PassManager(segment, cost=args.cost, check=inputs, rtol=args.rtol, atol=args.atol,
                              fixed_point=True)
        result = manager(current)
        first_cost = first_cost or result.cost_before
        print(result.report)
        sections.append(result.report.to_markdown())
        current = result.graph_module
    summary = []
    if first_cost is not None:
        before, after = first_cost.latency_s, get_cost_model(args.cost).graph_cost(current).latency_s
        summary.append(f"{loaded.name}: cost [{args.cost}] {before * 1e6:.1f} us -> {after * 1e6:.1f} us "
                       f"({before / after if after else float('inf'):.3f}x predicted)")
    with torch.no_grad():
        reference, output = gm(*inputs), current(*inputs)
    _, error, _ = compare_outputs(reference, output, args.rtol, args.atol)
    summary.append(f"max relative output error vs the original: {error:.2e}")
    if task is not None and task.evaluate is not None:
        summary.append(f"accuracy on {task.name}: {task.evaluate(gm) * 100:.2f}% -> "
                       f"{task.evaluate(current) * 100:.2f}%")
    print("\n" + "\n".join(summary))
    if args.report:
        from hant.tools.diff import diff

        text = (f"# hant optimize {loaded.name}\n\npasses: `{args.passes}`, input: "
                f"{', '.join(str(tuple(t.shape)) for t in inputs)}\n\n" + "\n\n".join(sections) + "\n\n"
                + "\n".join(f"- {line}" for line in summary)
                + f"\n\n## Before against after\n\n```\n{diff(gm, current, args.cost)}\n```\n")
        try:
            with open(args.report, "w") as handle:
                handle.write(text)
        except OSError as exc:
            raise InputError(f"cannot write {args.report!r}: {exc.strerror or exc}") from exc
        print(f"wrote {args.report}")
    if args.out:
        print(f"wrote {save_module(current, inputs, args.out)}")
    return 0
