"""``hant eval-cost``: measure real networks and score cost models' predictions against them.

    hant eval-cost SPEC[,SPEC...] --models torchvision:resnet18,torchvision:mobilenet_v2,...
                   [--runtime onnxruntime|torch] [--threads N] [--db PATH] [--input 1,3,224,224]
                   [--calibrate DB] [--per-network]

Each model is traced at ``--input`` (default batch 1, 224x224) and timed whole on this machine
(stored in the latency store ``--db``, so a rerun measures nothing). Then every cost model in
SPEC predicts every network, and a table gives Kendall tau, Spearman rho, the share within
±10 %, MAPE and RMSE per cost model. SPEC is a comma-separated list of cost-model specs
(``roofline:cpu``, ``lut:cpu-onnxruntime,db=data.db``, ``learned:p.pt``, ...; a part
``name=value`` is an option of the spec before it) and the proxies ``flops`` and ``params``,
which only rank.
"""

from __future__ import annotations

import argparse

from hant.errors import CostModelError, InputError
from hant.tools.models import positive_int

__all__ = ["add_parser", "run"]

DEFAULT_INPUT = "1,3,224,224"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval-cost`` subcommand."""
    parser = subparsers.add_parser(
        "eval-cost", help="measure real networks and compare cost models' predictions with them",
        description="Time each --models network whole on this machine (stored in --db, reused on reruns), "
                    "predict it with every cost model in SPEC, and print Kendall tau, Spearman rho, the share "
                    "within ±10%%, MAPE and RMSE per cost model.",
    )
    parser.add_argument("spec", metavar="SPEC[,SPEC...]",
                        help="cost models to score, comma-separated: roofline:cpu, lut:cpu-onnxruntime,db=PATH, "
                             "learned:PATH, ... and the ranking proxies flops and params")
    parser.add_argument("--models", required=True, metavar="MODEL[,MODEL...]",
                        help="networks to measure, comma-separated (at least two), e.g. "
                             "torchvision:resnet18,torchvision:mobilenet_v2")
    parser.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                        help="what measures the networks on the CPU (default onnxruntime)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="runtime threads (default: torch.get_num_threads())")
    parser.add_argument("--db", metavar="PATH", help="latency store for the measurements (default: the user cache)")
    parser.add_argument("--input", default=DEFAULT_INPUT, metavar="SHAPE",
                        help=f"input shape of every network (default {DEFAULT_INPUT})")
    parser.add_argument("--calibrate", metavar="DB",
                        help="calibrate every roofline model in SPEC on this store's op measurements "
                             "(same runtime, threads and device) before scoring it")
    parser.add_argument("--per-network", action="store_true", help="also print each network's predictions")
    parser.set_defaults(func=run)
    return parser


def _models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if len(set(names)) < 2:
        raise InputError(f"--models needs at least two different networks, got {text!r}; "
                         "e.g. --models torchvision:resnet18,torchvision:mobilenet_v2")
    return list(dict.fromkeys(names))


def _calibrated(specs: list[str], db: str, runtime: str, threads: int | None) -> dict:
    """``{spec: model}`` with every roofline spec calibrated on ``db``'s ops for this runtime key."""
    import os

    from hant.cost_models.evaluate import resolve
    from hant.cost_models.roofline import RooflineModel
    from hant.cost_models.store import LatencyStore
    from hant.cost_models.timing import runtime_for

    if not os.path.isfile(db):
        raise CostModelError(f"no latency store at {db!r} to calibrate on; make one with `hant profile --out {db}`")
    key = runtime_for("cpu", runtime, threads).key
    models: dict = {}
    for spec in specs:
        model, _ = resolve(spec)
        if isinstance(model, RooflineModel):
            with LatencyStore(db) as store:
                summary = model.calibrate(store.calibration_samples(runtime=key.runtime, device=key.device,
                                                                    threads=key.threads))
            models[f"{spec} (calibrated)"] = model
            print(f"{spec}: calibrated on {summary.samples} ops of {db} (op MAPE {summary.mape_before:.0%} -> "
                  f"{summary.mape_after:.0%})")
        else:
            models[spec] = spec
    return models


def run(args: argparse.Namespace) -> int:
    """Measure, predict and print the table."""
    from hant.cost_models.evaluate import compare, measure_networks, resolve, split_specs
    from hant.cost_models.timing import runtime_for
    from hant.tools.models import load_model, make_inputs, parse_shape, trace_for_cli

    specs = split_specs(args.spec)
    names = _models(args.models)
    shape = parse_shape(args.input)
    for spec in specs:                     # a bad spec fails before anything is measured
        resolve(spec)
    models = _calibrated(specs, args.calibrate, args.runtime, args.threads) if args.calibrate else specs
    graphs = {}
    for name in names:
        loaded = load_model(name)
        graphs[name] = trace_for_cli(loaded.module, make_inputs((shape,)))
    measured = measure_networks(graphs, args.runtime, threads=args.threads, db=args.db)
    comparison = compare(graphs, measured, models)
    print(f"{len(graphs)} networks at {args.input}, measured whole: "
          f"{runtime_for('cpu', args.runtime, args.threads).describe()}")
    print(comparison.table())
    if args.per_network:
        print()
        print(comparison.networks_table())
    return 0
