"""``hant profile``: measure random networks from the network space into a latency store.

    hant profile --runtime onnxruntime --n 2000 --out data.db [--threads N] [--seed S] [--no-nodes]
                 [--kernels K]

``--kernels K`` also times K random kernels alone (fused conv+BN+act, depthwise, linear, pools, ...;
see :mod:`hant.cost_models.learned.kernels`), what ``hant fit --model kernel`` learns from.
Resumable: running the same command again skips the networks and kernels already stored.
"""

from __future__ import annotations

import argparse

from hant.cost_models.netspace import SPACES
from hant.cost_models.profile import profile
from hant.tools.models import positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand."""
    parser = subparsers.add_parser(
        "profile", help="measure random networks (whole and node by node) into a SQLite latency store",
        description="Sample N networks (ResNet, MobileNetV2/V3, EfficientNet, RegNet-like; 96..320 px) "
                    "deterministically from --seed, time each one whole and each of its ops alone on this "
                    "machine, and store them in --out. Resumes where a previous run stopped.",
    )
    parser.add_argument("--runtime", choices=("onnxruntime", "torch", "cuda"), default="onnxruntime",
                        help="onnxruntime (CPU EP), torch (eager CPU) or cuda (eager torch, CUDA events)")
    parser.add_argument("--n", type=positive_int, default=100, help="networks to measure (default 100)")
    parser.add_argument("--out", metavar="DB", help="store file (default: the user cache, ~/.cache/hant/latency.db)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="runtime threads (default: torch.get_num_threads())")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--space", choices=sorted(SPACES), default="default",
                        help="network space: default (96..320 px) or tiny (smoke tests)")
    parser.add_argument("--no-nodes", dest="nodes", action="store_false",
                        help="time networks whole only, not each op alone")
    parser.add_argument("--kernels", type=int, default=0, metavar="K",
                        help="also time K random kernels alone, for `hant fit --model kernel` (default 0)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Profile and print a one-line summary."""
    device, runtime = ("cuda", "torch") if args.runtime == "cuda" else ("cpu", args.runtime)
    summary = profile(args.n, args.out, runtime=runtime, threads=args.threads, seed=args.seed,
                      measure_nodes=args.nodes, space=args.space, device=device)
    print(f"profiled {summary.measured} networks, {summary.skipped} already stored, "
          f"{summary.total} in all, into {summary.store} ({summary.runtime})")
    if args.kernels > 0:
        from hant.cost_models.learned.kernels import profile_kernels, sampled_kernels

        measured, skipped = profile_kernels(sampled_kernels(args.kernels, args.seed), summary.store, runtime=runtime,
                                            threads=args.threads, device=device)
        print(f"timed {measured} kernels alone, {skipped} already stored, into {summary.store}")
    return 0
