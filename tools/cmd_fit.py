"""``hant fit``: train a learned latency predictor and print its held-out metrics.

Two sources of measurements:

* a latency store from ``hant profile``: ``hant fit data.db --model gnn --out predictor.pt``;
* a table of (architecture, latency) rows for one device column:
  ``hant fit --table FILE.csv.gz --target COLUMN --builder nb201 --train-size N --out P.pt``
  (``--table nb201`` is the NAS-Bench-201 table shipped with hant).

The saved file is the cost model ``learned:P.pt``.
"""

from __future__ import annotations

import argparse

from hant.errors import CostModelError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``fit`` subcommand."""
    parser = subparsers.add_parser(
        "fit", help="train a learned latency predictor (learned:PATH) and print held-out metrics",
        description="Train a graph-network (gnn) or per-kernel (perop) latency predictor from a latency store "
                    "or from a table of architecture/latency rows, hold rows out, and print RMSE, MAPE, "
                    "the share within ±10%%, Kendall tau and Spearman rho on them.",
    )
    parser.add_argument("db", nargs="?", help="latency store from `hant profile` (SQLite file)")
    parser.add_argument("--model", choices=("gnn", "perop", "kernel"), default="gnn",
                        help="predictor kind (default gnn); kernel: store only, needs kernels timed alone "
                             "(`hant profile --kernels K`)")
    parser.add_argument("--out", required=True, metavar="PATH", help="where to save the predictor file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    parser.add_argument("--holdout", type=float, default=0.2, help="store: share of networks held out (default 0.2)")
    parser.add_argument("--runtime", help="store: use only networks measured with this runtime")
    parser.add_argument("--device", help="store: use only networks measured on this device fingerprint")
    parser.add_argument("--table", metavar="FILE", help="CSV(.gz) of architecture/latency rows; 'nb201' for the "
                                                        "NAS-Bench-201 table shipped with hant")
    parser.add_argument("--target", metavar="COLUMN", help="table: the latency column to learn (milliseconds)")
    parser.add_argument("--builder", default="nb201", help="table: network family of the architecture column "
                                                           "(default nb201)")
    parser.add_argument("--train-size", type=int, default=900, metavar="N",
                        help="table: rows to train on, a tenth of them (from 50 rows on) kept for early "
                             "stopping; the rest are held out and scored (default 900)")
    parser.add_argument("--fusion", choices=("fused", "eager"),
                        help="perop: kernel fusion of the target runtime (default fused)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from hant.cost_models.learned import data_path
    from hant.cost_models.learned.fit import fit_db, fit_table, format_metrics

    config = {"fusion": args.fusion} if args.fusion and args.model == "perop" else None
    if args.table is not None:
        if args.db is not None:
            raise CostModelError("give either a latency store or --table, not both")
        if args.model == "kernel":
            raise CostModelError("--model kernel learns from kernels timed alone in a latency store; give "
                                 "the store (hant fit data.db --model kernel), not --table")
        if not args.target:
            raise CostModelError("--table needs --target COLUMN, the device column to learn")
        table = data_path() if args.table == "nb201" else args.table
        result = fit_table(table, args.target, builder=args.builder, train_size=args.train_size, seed=args.seed,
                           out=args.out, model=args.model, config=config)
        print(f"{args.target}: {args.model} trained on {args.train_size} rows ({len(result.validation_rows)} of them "
              f"only for early stopping) in {result.fit_seconds:.1f} s")
    else:
        if args.db is None:
            raise CostModelError("give a latency store (hant fit data.db ...) or --table FILE --target COLUMN")
        result = fit_db(args.db, model=args.model, out=args.out, holdout=args.holdout, seed=args.seed,
                        runtime=args.runtime, device=args.device, config=config, verbose=False)
        print(f"{args.model} trained on {len(result.train_rows)} networks in {result.fit_seconds:.1f} s")
    print(format_metrics(result.metrics))
    print(f"saved {args.out}; use it as --cost learned:{args.out}")
    return 0
