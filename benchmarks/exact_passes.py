"""Benchmark the "exact" preset: latency before/after under torch eager and onnxruntime, next to fx.fuse.

    python benchmarks/exact_passes.py              # full run, 224x224, writes benchmarks/results/exact_passes.md
    python benchmarks/exact_passes.py --quick      # small inputs and few runs: checks that everything runs

For every model (random weights, randomised BatchNorm statistics, eval mode, batch 1, CPU):

* variants: ``original`` (the model), ``fx.fuse`` (``torch.fx.experimental.optimization.fuse``)
  and ``hant exact`` (``hant.optimize(model, x, passes="exact")``);
* latency under torch eager and under onnxruntime (each variant exported the same way:
  ``hant.export_onnx``, i.e. torch.onnx + onnx-simplifier, checked against the module);
* timing: warm-up, then ``--runs`` rounds in which every variant runs once, in turn
  (A B C A B C ...), so drifts in machine load hit all variants alike. Each call is timed
  by the wall clock and by the CPU time of the calling thread (with one intra-op thread
  torch and onnxruntime compute on it), which the load of a shared machine disturbs far
  less. The table gives the median per variant and, as its speedup, the median and
  interquartile range of the per-round ratios ``original / variant``;
* intra-op threads: ``--threads`` (torch.set_num_threads and onnxruntime
  intra_op_num_threads alike), stated in the table;
* the time the "exact" pipeline took (trace + passes + numeric checks), wall clock and CPU
  time of the process, and the pipeline time alone on efficientnet_v2_l (median of
  ``--repeats`` runs, with and without numeric checks);
* a RepVGG-style multi-branch network (3x3+BN, 1x1+BN and identity-BN branches summed)
  after "exact", against a hand-built single-branch 3x3 network of the same shapes.

Finished rows are kept in ``benchmarks/results/exact_passes.json`` (keyed by model and
settings) and reused after an interruption; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torchvision
from torch.fx.experimental.optimization import fuse as fx_fuse
from tqdm import tqdm

import hant
from hant.tools.testing import randomize_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_rounds, ort_session  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")


# ------------------------------------------------------------ RepVGG-style networks

class RepVGGBlock(nn.Module):
    """Training-time RepVGG block: 3x3 conv+BN + 1x1 conv+BN (+ identity BN when shapes allow), summed, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


STAGES = ((3, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
          (256, 256, 1))


def repvgg_multi_branch() -> nn.Module:
    return randomize_bn(nn.Sequential(*(RepVGGBlock(*s) for s in STAGES)), 7)


def repvgg_single_branch() -> nn.Module:
    """The deploy-time network a perfect collapse gives: one biased 3x3 conv + ReLU per block."""
    layers = []
    for cin, cout, stride in STAGES:
        layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()]
    return nn.Sequential(*layers).eval()


# ------------------------------------------------------------ timing

def ratio_stats(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``numerator / denominator``."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def measure(variants: dict[str, nn.Module], x: torch.Tensor, args, folder: str) -> dict:
    eager = {name: (lambda m=m: m(x)) for name, m in variants.items()}
    with torch.no_grad():
        eager_rounds = interleaved_rounds(eager, args.runs, args.warmup)
        sessions = {name: ort_session(m, x, args.threads, folder, name.replace(" ", "_").replace(".", "_"))
                    for name, m in variants.items()}
        ort_rounds = interleaved_rounds(sessions, args.runs, args.warmup)
    return {"eager": eager_rounds, "ort": ort_rounds}


def timed_optimize(model: nn.Module, x: torch.Tensor, **options) -> tuple[hant.OptimizeResult, float, float]:
    """``hant.optimize(model, x, passes="exact", **options)`` with its wall and process CPU seconds."""
    start_cpu, start = time.process_time(), time.perf_counter()
    result = hant.optimize(model, x, passes="exact", **options)
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), 1)
    x = torch.randn(1, 3, args.size, args.size)
    result, wall_s, cpu_s = timed_optimize(model, x)
    fused = fx_fuse(model)  # copies the model (inplace=False)
    with tempfile.TemporaryDirectory() as folder:
        timings = measure({"original": model, "fx.fuse": fused, "hant exact": result.module}, x, args, folder)
    return {"pipeline_s": wall_s, "pipeline_cpu_s": cpu_s, "max_error": result.max_error, **timings}


def bench_repvgg(args) -> dict:
    multi, single = repvgg_multi_branch(), repvgg_single_branch()
    x = torch.randn(1, 3, args.size, args.size)
    result, wall_s, cpu_s = timed_optimize(multi, x)
    convs = sum(isinstance(m, nn.Conv2d) for m in result.module.modules())
    with tempfile.TemporaryDirectory() as folder:
        timings = measure({"original": multi, "hant exact": result.module, "single-branch": single}, x, args, folder)
    return {"pipeline_s": wall_s, "pipeline_cpu_s": cpu_s, "max_error": result.max_error, "convs_after": convs,
            **timings}


def bench_pipeline_only(name: str, args) -> dict:
    """The pipeline alone, ``--repeats`` times with and without numeric checks, in turn; medians and ranges."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), 1)
    x = torch.randn(1, 3, args.size, args.size)
    checked, unchecked = [], []
    for _ in range(args.repeats):
        result, wall_s, cpu_s = timed_optimize(model, x)
        checked.append((wall_s, cpu_s))
        _, wall_s, cpu_s = timed_optimize(model, x, check=False)
        unchecked.append((wall_s, cpu_s))
    row = {"max_error": result.max_error, "repeats": args.repeats}
    for key, runs in (("pipeline", checked), ("pipeline_unchecked", unchecked)):
        for clock, values in (("s", [w for w, _ in runs]), ("cpu_s", [c for _, c in runs])):
            row[f"{key}_{clock}"] = statistics.median(values)
            row[f"{key}_{clock}_range"] = [min(values), max(values)]
    return row


# ------------------------------------------------------------ table

def _speedup(rounds: dict, clock: str, variant: str, baseline: str = "original") -> str:
    median, q1, q3 = ratio_stats(rounds[clock][baseline], rounds[clock][variant])
    return f"{median:.3f}x [{q1:.3f}, {q3:.3f}]"


def latency_rows(name: str, row: dict) -> list[str]:
    lines = []
    eager, ort = row["eager"], row["ort"]
    for variant in eager["wall"]:
        pipeline = (f"{row['pipeline_s']:.2f} / {row['pipeline_cpu_s']:.2f} | {row['max_error']:.1e} |"
                    if variant == "hant exact" else " | |")
        lines.append(
            f"| {name} | {variant} | {statistics.median(eager['wall'][variant]) * 1e3:.2f} | "
            f"{_speedup(eager, 'wall', variant)} | {_speedup(eager, 'cpu', variant)} | "
            f"{statistics.median(ort['wall'][variant]) * 1e3:.2f} | {_speedup(ort, 'wall', variant)} | "
            f"{_speedup(ort, 'cpu', variant)} | " + pipeline)
    return lines


TABLE_HEAD = ["| model | variant | eager ms | eager speedup (wall) | eager speedup (CPU) | onnxruntime ms | "
              "onnxruntime speedup (wall) | onnxruntime speedup (CPU) | pipeline s (wall / CPU) | error |",
              "|---|---|---|---|---|---|---|---|---|---|"]


def write_table(results: dict, args, path: str) -> str:
    lines = [
        "# `exact` passes: latency before and after",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, **shared with other "
        f"jobs while measuring**; torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__} "
        f"(CPUExecutionProvider); batch 1, input 3x{args.size}x{args.size}, float32, intra-op threads: "
        f"{args.threads} (torch and onnxruntime); {args.runs} interleaved rounds after {args.warmup} warm-up "
        f"rounds; measured {time.strftime('%Y-%m-%d')}"
        + (" (**--quick: a smoke run, not a measurement**)" if args.quick else "") + ".",
        "",
        "ms = median wall-clock milliseconds per call. Speedup = median of the per-round ratios original / "
        "variant, [interquartile range]; (wall) from wall-clock times, (CPU) from the calling thread's CPU time, "
        "which the other jobs on the machine disturb much less. Pipeline = `hant.optimize(..., "
        "passes=\"exact\")` (trace, passes, numeric checks): wall-clock / process CPU seconds. Error = max "
        "relative output error of hant's result.",
        "",
        *TABLE_HEAD,
    ]
    for name in args.models:
        if name in results:
            lines += latency_rows(name, results[name])
    targets = ["", "Targets, each from per-round ratios of one run: median [interquartile range].", ""]
    for name in args.models:
        if name in results:
            eager, ort = results[name]["eager"], results[name]["ort"]
            targets.append(
                f"- {name}: eager fx.fuse / hant exact = {_speedup(eager, 'wall', 'hant exact', 'fx.fuse')} wall, "
                f"{_speedup(eager, 'cpu', 'hant exact', 'fx.fuse')} CPU (target >= 1); onnxruntime original / hant "
                f"exact = {_speedup(ort, 'wall', 'hant exact')} wall, {_speedup(ort, 'cpu', 'hant exact')} CPU "
                "(target >= 1)")
    if "repvgg" in results:
        row = results["repvgg"]
        lines += ["", f"RepVGG-style multi-branch network ({len(STAGES)} blocks) after `exact`: "
                      f"{row['convs_after']} convs left; single-branch = hand-built 3x3 conv + ReLU network of "
                      f"the same shapes (the limit).", "", *TABLE_HEAD]
        lines += latency_rows("repvgg-style", row)
        e, o = row["eager"], row["ort"]
        targets.append(
            f"- repvgg-style: collapsed / single-branch latency = "
            f"{_speedup(e, 'wall', 'single-branch', 'hant exact')} eager wall, "
            f"{_speedup(e, 'cpu', 'single-branch', 'hant exact')} eager CPU, "
            f"{_speedup(o, 'wall', 'single-branch', 'hant exact')} onnxruntime wall, "
            f"{_speedup(o, 'cpu', 'single-branch', 'hant exact')} onnxruntime CPU (target <= 1.05)")
    big = results.get(args.big)
    if big:
        def spread(key: str) -> str:
            low, high = big[f"{key}_range"]
            return f"{big[key]:.2f} s [{low:.2f}, {high:.2f}]"

        targets.append(
            f"- `exact` pipeline on {args.big} (input 3x{args.size}x{args.size}), median [min, max] of "
            f"{big['repeats']} runs: {spread('pipeline_s')} wall, {spread('pipeline_cpu_s')} CPU with numeric "
            f"checks; {spread('pipeline_unchecked_s')} wall, {spread('pipeline_unchecked_cpu_s')} CPU without "
            f"(check=False) (target <= 5 s); max relative error {big['max_error']:.1e}")
    text = "\n".join(lines + targets) + "\n"
    with open(path, "w") as handle:
        handle.write(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, 5 rounds: a smoke run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of torchvision models")
    parser.add_argument("--big", default="efficientnet_v2_l", help="model for the pipeline-time-only row")
    parser.add_argument("--size", type=int, help="input height and width (default 224, 64 with --quick)")
    parser.add_argument("--runs", type=int, help="interleaved timing rounds (default 50, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the pipeline alone on --big")
    parser.add_argument("--out", help="markdown table path (default benchmarks/results/exact_passes.md, "
                                       "exact_passes_quick.md with --quick)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows kept from an earlier run")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.size = args.size or (64 if args.quick else 224)
    args.runs = args.runs or (5 if args.quick else 50)
    args.out = args.out or os.path.join(RESULTS, "exact_passes_quick.md" if args.quick else "exact_passes.md")
    torch.set_num_threads(args.threads)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    store = os.path.splitext(args.out)[0] + ".json"
    settings = f"v2,size={args.size},threads={args.threads},runs={args.runs},warmup={args.warmup}"
    kept = {}
    if os.path.exists(store) and not args.fresh:
        with open(store) as handle:
            kept = json.load(handle).get(settings, {})
    jobs = [(name, lambda n=name: bench_model(n, args)) for name in args.models]
    jobs += [("repvgg", lambda: bench_repvgg(args)), (args.big, lambda: bench_pipeline_only(args.big, args))]
    for name, job in tqdm(jobs, desc="exact_passes", unit="model"):
        if name in kept:
            continue
        kept[name] = job()
        everything = {}
        if os.path.exists(store):
            with open(store) as handle:
                everything = json.load(handle)
        everything[settings] = kept
        with open(store, "w") as handle:
            json.dump(everything, handle, indent=1)
    print(write_table(kept, args, args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
