"""Benchmark the "exact" preset: latency before/after under torch eager and onnxruntime, next to fx.fuse.

    python benchmarks/exact_passes.py              # full run, 224x224, writes benchmarks/results/exact_passes.md
    python benchmarks/exact_passes.py --quick      # small inputs and few runs: checks that everything runs

For every model (random weights, randomised BatchNorm statistics, eval mode, batch 1, CPU):

* variants: ``original`` (the model), ``fx.fuse`` (``torch.fx.experimental.optimization.fuse``)
  and ``hant exact`` (``hant.optimize(model, x, passes="exact")``);
* latency under torch eager and under onnxruntime (each variant exported the same way:
  ``hant.export_onnx``, i.e. torch.onnx + onnx-simplifier, checked against the module);
* timing: warm-up, then ``--runs`` rounds in which every variant runs once, in turn
  (A B C A B C ...), so drifts in machine load hit all variants alike; the table gives the
  median per variant and its ratio to ``original`` measured in the same rounds;
* intra-op threads: ``--threads`` (torch.set_num_threads and onnxruntime
  intra_op_num_threads alike), stated in the table;
* the time the "exact" pipeline took (trace + passes + numeric checks), and the pipeline
  time alone on efficientnet_v2_l;
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
from common import interleaved_medians, ort_session  # noqa: E402

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

def measure(variants: dict[str, nn.Module], x: torch.Tensor, args, folder: str) -> dict:
    eager = {name: (lambda m=m: m(x)) for name, m in variants.items()}
    with torch.no_grad():
        eager_s = interleaved_medians(eager, args.runs, args.warmup)
        sessions = {name: ort_session(m, x, args.threads, folder, name.replace(" ", "_").replace(".", "_"))
                    for name, m in variants.items()}
        ort_s = interleaved_medians(sessions, args.runs, args.warmup)
    return {"eager_s": eager_s, "ort_s": ort_s}


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), 1)
    x = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    result = hant.optimize(model, x, passes="exact")
    pipeline_s = time.perf_counter() - start
    fused = fx_fuse(model)  # copies the model (inplace=False)
    with tempfile.TemporaryDirectory() as folder:
        timings = measure({"original": model, "fx.fuse": fused, "hant exact": result.module}, x, args, folder)
    return {"pipeline_s": pipeline_s, "max_error": result.max_error, **timings}


def bench_repvgg(args) -> dict:
    multi, single = repvgg_multi_branch(), repvgg_single_branch()
    x = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    result = hant.optimize(multi, x, passes="exact")
    pipeline_s = time.perf_counter() - start
    convs = sum(isinstance(m, nn.Conv2d) for m in result.module.modules())
    with tempfile.TemporaryDirectory() as folder:
        timings = measure({"original": multi, "hant exact": result.module, "single-branch": single}, x, args, folder)
    return {"pipeline_s": pipeline_s, "max_error": result.max_error, "convs_after": convs, **timings}


def bench_pipeline_only(name: str, args) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), 1)
    x = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    result = hant.optimize(model, x, passes="exact")
    checked_s = time.perf_counter() - start
    start = time.perf_counter()
    hant.optimize(model, x, passes="exact", check=False)
    unchecked_s = time.perf_counter() - start
    return {"pipeline_s": checked_s, "pipeline_unchecked_s": unchecked_s, "max_error": result.max_error}


# ------------------------------------------------------------ table

def latency_rows(name: str, row: dict, baseline: str = "original") -> list[str]:
    lines = []
    eager, ort = row["eager_s"], row["ort_s"]
    for variant in eager:
        lines.append(
            f"| {name} | {variant} | {eager[variant] * 1e3:.2f} | {eager[baseline] / eager[variant]:.3f}x | "
            f"{ort[variant] * 1e3:.2f} | {ort[baseline] / ort[variant]:.3f}x | "
            + (f"{row['pipeline_s']:.2f} | {row['max_error']:.1e} |" if variant == "hant exact" else " | |"))
    return lines


def write_table(results: dict, args, path: str) -> str:
    header = [
        "# `exact` passes: latency before and after",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
        f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; "
        f"batch 1, input 3x{args.size}x{args.size}, float32, intra-op threads: {args.threads}; "
        f"median of {args.runs} interleaved rounds after {args.warmup} warm-up rounds"
        + (" (**--quick: a smoke run, not a measurement**)" if args.quick else "") + ".",
        "Speedup = original median / variant median (same rounds). Pipeline = `hant.optimize(..., passes=\"exact\")`"
        " wall time (trace, passes, numeric checks). Error = max relative output error of hant's result.",
        "",
        "| model | variant | eager ms | eager speedup | onnxruntime ms | onnxruntime speedup | pipeline s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = list(header)
    for name in args.models:
        if name in results:
            lines += latency_rows(name, results[name])
    if "repvgg" in results:
        row = results["repvgg"]
        lines += ["", f"RepVGG-style multi-branch network ({len(STAGES)} blocks) after `exact`: "
                      f"{row['convs_after']} convs left; single-branch = hand-built 3x3 conv + ReLU network of "
                      f"the same shapes (the limit).", "",
                  "| model | variant | eager ms | eager speedup | onnxruntime ms | onnxruntime speedup | pipeline s "
                  "| error |", "|---|---|---|---|---|---|---|---|"]
        lines += latency_rows("repvgg-style", row)
        e, o = row["eager_s"], row["ort_s"]
        lines += ["", f"collapsed / single-branch latency: eager {e['hant exact'] / e['single-branch']:.3f}, "
                      f"onnxruntime {o['hant exact'] / o['single-branch']:.3f} (target <= 1.05)."]
    big = results.get(args.big)
    if big:
        lines += ["", f"`exact` pipeline on {args.big} (input 3x{args.size}x{args.size}): {big['pipeline_s']:.2f} s "
                      f"with numeric checks, {big['pipeline_unchecked_s']:.2f} s without (check=False) "
                      f"(target <= 5 s); max relative error {big['max_error']:.1e}."]
    text = "\n".join(lines) + "\n"
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
    settings = f"size={args.size},threads={args.threads},runs={args.runs},warmup={args.warmup}"
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
