"""``hant optimize MODEL --input SHAPE --passes exact --out FILE``: rewrite a model, prove it, save it.

The model is traced on random inputs of the given shape, the passes run to a fixed point
under the PassManager (every exact pass checked on those inputs, rolled back when it breaks
numerics), the report table is printed, and the result is written in the format the
``--out`` suffix names: ``.onnx`` (exported, simplified and checked with onnxruntime),
``.pt`` (``torch.save`` of the module) or ``.pt2`` (a ``torch.export`` program).
"""

from __future__ import annotations

import argparse
import os

import torch

from hant.cost_models import available as available_costs
from hant.cost_models import get as get_cost_model
from hant.errors import ExportError, InputError
from hant.graphs.export import export_onnx
from hant.passes import PRESETS, PassManager, available, resolve
from hant.tools.models import add_model_arguments, model_and_inputs, trace_for_cli

__all__ = ["add_parser", "run", "OUTPUT_SUFFIXES"]

OUTPUT_SUFFIXES = (".onnx", ".pt", ".pt2")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``optimize`` subcommand."""
    parser = subparsers.add_parser(
        "optimize", help="rewrite a model with passes (exact: BN folding, linear folding, fusion) and save it",
        description="Trace MODEL, run the passes with a numeric check on random inputs (a pass that breaks "
                    "numerics is rolled back), print the report and write the result; the --out suffix picks "
                    "the format: .onnx, .pt (torch.save of the module) or .pt2 (torch.export).",
    )
    add_model_arguments(parser)
    parser.add_argument("--passes", default="exact", metavar="LIST",
                        help=f"a preset ({', '.join(sorted(PRESETS))}) or a comma list of passes "
                             f"({', '.join(available())}); default exact")
    parser.add_argument("--cost", default="roofline:cpu", metavar="SPEC",
                        help=f"cost-model spec (default roofline:cpu); prefixes: {', '.join(available_costs())}")
    parser.add_argument("--out", metavar="FILE", help="where to write the result: FILE.onnx, FILE.pt or FILE.pt2")
    parser.add_argument("--report", metavar="FILE.md", help="also write the report as a markdown file")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the check (default 1e-4)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check (default 1e-5)")
    parser.set_defaults(func=run)
    return parser


def _save(module, inputs, path: str) -> str:
    try:
        if path.endswith(".onnx"):
            result = export_onnx(module, inputs, path)
            return f"{path} (ONNX, onnxruntime max relative error {result.max_error:.2e})"
        if path.endswith(".pt2"):
            try:
                program = torch.export.export(module, inputs)
            except Exception as exc:
                raise ExportError(f"torch.export failed on the optimized module: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0]}; save it as .pt or .onnx instead") from exc
            torch.export.save(program, path)
            return f"{path} (torch.export program)"
        torch.save(module, path)
        return f"{path} (torch.save of the module; load with torch.load(path, weights_only=False))"
    except OSError as exc:
        raise InputError(f"cannot write {path!r}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Load, trace, optimize, print the report, write the outputs."""
    if args.out and not args.out.endswith(OUTPUT_SUFFIXES):
        raise InputError(f"--out {args.out!r}: the suffix picks the format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    for path in (args.out, args.report):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise InputError(f"cannot write {path!r}: folder {folder!r} does not exist")
    resolve(args.passes), get_cost_model(args.cost)  # unknown names fail before any model loads
    loaded, inputs = model_and_inputs(args)
    gm = trace_for_cli(loaded.module, inputs)
    manager = PassManager(args.passes, cost=args.cost, check=inputs, rtol=args.rtol, atol=args.atol,
                          fixed_point=True)
    result = manager(gm)
    print(result.report)
    summary = []
    if result.cost_before is not None:
        before, after = result.cost_before.latency_s, result.cost_after.latency_s
        summary.append(f"{loaded.name}: cost [{args.cost}] {before * 1e6:.1f} us -> {after * 1e6:.1f} us "
                       f"({before / after if after else float('inf'):.3f}x predicted)")
    summary.append(f"max relative output error vs the original: {result.max_error:.2e}")
    print("\n" + "\n".join(summary))
    if args.report:
        text = (f"# hant optimize {loaded.name}\n\npasses: `{args.passes}`, input: "
                f"{', '.join(str(tuple(t.shape)) for t in inputs)}\n\n{result.report.to_markdown()}\n\n"
                + "\n".join(f"- {line}" for line in summary) + "\n")
        try:
            with open(args.report, "w") as handle:
                handle.write(text)
        except OSError as exc:
            raise InputError(f"cannot write {args.report!r}: {exc.strerror or exc}") from exc
        print(f"wrote {args.report}")
    if args.out:
        print(f"wrote {_save(result.graph_module, inputs, args.out)}")
    return 0
