"""Benchmark fold_linear's head folding: "exact" with and without folding through pool -> flatten -> Linear.

    python benchmarks/head_fold.py            # writes benchmarks/results/head_fold.md
    python benchmarks/head_fold.py --quick    # few rounds, small input for torchvision: checks that it runs

Two networks whose last ops before the global average pool are linear (random weights,
randomised BatchNorm statistics, eval mode, batch 1):

* the digits MobileNetV2 teacher (1x1x32x32) with the head ReLU6 (``features[7][2]``) and
  the last block's (``features[6]``) activations removed;
* torchvision mobilenet_v2 (1x3x224x224) with the head ReLU6 (``features[18][2]``) removed.

Variants, both the "exact" preset and both checked against the model:

* ``without head fold``: the graph fold_linear built before it could fold through heads:
  ``hant.optimize(model.features)`` followed by the untouched head (pool, flatten, classifier);
* ``with head fold``: ``hant.optimize(model)``, where the expression continues through the
  pool, the flatten and the Linear.

Both are exported the same way (``hant.export_onnx``: torch.onnx + onnx-simplifier) and timed
under onnxruntime (one intra-op thread) in interleaved rounds (A B A B ...), ``--calls``
consecutive calls per variant and round, each call one sample. The table gives the median wall
and thread-CPU time per call, the ratio of the medians and the median (quartiles) of the
per-round ratios ``without / with``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate

import hant
from hant.cost_models import get as cost_model
from hant.graphs.ops import op_kind
from hant.tools.digits import build_teacher
from hant.tools.testing import randomize_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_line, interleaved_rounds, ort_session  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def digits_mobilenet() -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    """The model, its head after ``features`` as modules, and an input."""
    torch.manual_seed(0)
    model = randomize_bn(build_teacher("mobilenet"), 1).eval()
    model.features[7][2] = nn.Identity()
    model.features[6].conv[2] = nn.Identity()
    model.features[6].conv[5] = nn.Identity()
    return model, [model.pool, nn.Flatten(1), model.classifier], torch.randn(1, 1, 32, 32)


def torchvision_mobilenet(size: int) -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    """The model, its head after ``features`` as modules (its forward pools functionally), and an input."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(), 1).eval()
    model.features[18][2] = nn.Identity()
    return model, [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier], torch.randn(1, 3, size, size)


def variants(model: nn.Module, head: list[nn.Module], x: torch.Tensor) -> dict[str, nn.Module]:
    """The "exact" preset without the head fold (features folded alone, head kept) and with it."""
    features = hant.optimize(model.features, x, passes="exact").module
    without = nn.Sequential(features, *head).eval()
    return {"without head fold": without, "with head fold": hant.optimize(model, x, passes="exact").module}


def describe(module: nn.Module, x: torch.Tensor) -> tuple[str, int]:
    """The last compute ops of the traced module (its head) and its MACs (flops model)."""
    gm = hant.trace(module, x)
    kinds = [op_kind(n) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    return " -> ".join(kinds[-5:]), int(cost_model("flops").graph_cost(gm).total.macs)


def bench(title: str, model: nn.Module, head: list[nn.Module], x: torch.Tensor, args) -> list[list]:
    built = variants(model, head, x)
    with torch.no_grad():
        reference = model(x)
        errors = {name: float((m(x) - reference).abs().max() / reference.abs().max()) for name, m in built.items()}
    with tempfile.TemporaryDirectory() as folder:
        sessions = {name: ort_session(m, x, args.threads, folder, name.replace(" ", "_")) for name, m in built.items()}
        rounds = interleaved_rounds(sessions, args.runs, args.warmup, args.calls)
    wall, cpu = rounds["wall"], rounds["cpu"]
    a, b = "without head fold", "with head fold"
    ratios = sorted(x_ / y_ for x_, y_ in zip(wall[a], wall[b]))
    q1, median_ratio, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    rows = []
    for name, module in built.items():
        head, macs = describe(module, x)
        rows.append([title, name, head, f"{macs / 1e6:.3f}", f"{errors[name]:.1e}",
                     f"{statistics.median(wall[name]) * 1e6:.1f}", f"{statistics.median(cpu[name]) * 1e6:.1f}"])
    speed = statistics.median(wall[a]) / statistics.median(wall[b])
    speed_cpu = statistics.median(cpu[a]) / statistics.median(cpu[b])
    rows[-1] += [f"{speed:.3f}", f"{speed_cpu:.3f}", f"{median_ratio:.3f} ({q1:.3f}-{q3:.3f})"]
    rows[0] += ["1", "1", ""]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 rounds, 64x64 torchvision input: a smoke run")
    parser.add_argument("--runs", type=int, help="interleaved rounds (default 100, 10 with --quick)")
    parser.add_argument("--calls", type=int, default=10, help="consecutive calls per variant and round")
    parser.add_argument("--warmup", type=int, default=20, help="calls of each variant before timing")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--out", default=os.path.join(RESULTS, "head_fold.md"))
    args = parser.parse_args(argv)
    args.runs = args.runs or (10 if args.quick else 100)
    torch.set_num_threads(args.threads)
    size = 64 if args.quick else 224
    load_before = os.getloadavg()[0]
    rows = bench("digits MobileNetV2, 1x1x32x32", *digits_mobilenet(), args)
    rows += bench(f"torchvision mobilenet_v2, 1x3x{size}x{size}", *torchvision_mobilenet(size), args)
    headers = ["network", "variant", "last ops", "MMACs", "max rel error", "median wall us", "median CPU us",
               "speedup (wall medians)", "speedup (CPU medians)", "per-round wall ratio, median (IQR)"]
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = "\n".join([
        "# Folding classifier heads (benchmarks/head_fold.py)",
        "",
        f"Run {started}. {environment_line(args.threads, 1)}. {args.runs} interleaved rounds x {args.calls} calls "
        f"per variant (after {args.warmup} warm-up calls), each call one sample; medians per call. Machine shared "
        f"with other jobs (1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run, "
        f"{os.cpu_count()} cores): compare the variants within a row pair only; where wall and CPU medians differ, "
        "other jobs took the core, and the CPU-time ratio is the steadier figure.",
        "",
        "`without head fold`: the \"exact\" preset on `model.features`, then the untouched pool -> flatten -> "
        "classifier (what fold_linear gave before it folded through heads). `with head fold`: the \"exact\" "
        "preset on the whole model. Speedups are `without / with`. Random weights, randomised BatchNorm "
        "statistics.",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
    ])
    if not args.quick:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
