"""Benchmark of operator substitution (HANT) on the digits teachers, under onnxruntime on this CPU.

Writes ``benchmarks/results/substitute.md`` (and a Pareto PNG per teacher):
* per teacher, the Pareto table over budgets: predicted latency (the cost model's sum of
  site prices), measured onnxruntime latency of the student (batch 1, interleaved with the
  teacher, medians), test accuracy, speedup against the teacher;
* the integer-program timing: 100 sites x 200 candidates, median of several solves.

    python benchmarks/substitute.py                 # full run (slow: distils every family)
    python benchmarks/substitute.py --quick         # a few families, few steps: minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_line, interleaved_medians, ort_session  # noqa: E402

from hant.passes.selection import multiple_choice  # noqa: E402
from hant.passes.substitute import substitute  # noqa: E402
from hant.tools import digits  # noqa: E402
from hant.tools.plots import pareto_plot  # noqa: E402


def ilp_timing(sites: int = 100, options: int = 200, repeats: int = 5) -> float:
    """Median seconds to solve a random multiple-choice knapsack of the given size at a 50% budget."""
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        lat = rng.uniform(1.0, 10.0, size=(sites, options))
        score = rng.uniform(0.0, 1.0, size=(sites, options)) / lat   # faster options score worse
        budget = 0.5 * lat.max(axis=1).sum()
        start = time.perf_counter()
        multiple_choice(score.tolist(), lat.tolist(), budget)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_teacher(name: str, args, folder: str) -> tuple[str, list]:
    teacher = digits.teacher(name, progress=False)
    train, test = digits.loaders(64)
    x = torch.randn(1, *digits.INPUT_SHAPE[1:])
    start = time.perf_counter()
    result = substitute(teacher, x, train, budget=args.budgets[0], budgets=args.budgets, cost=args.cost,
                        candidates=args.families, run_dir=os.path.join(args.run_dir, name), steps=args.steps,
                        calibration_batches=args.calibration_batches, finetune_epochs=args.finetune_epochs,
                        evaluate=lambda m: digits.evaluate(m, test), show_progress=True)
    search_s = time.perf_counter() - start
    teacher_acc = digits.evaluate(teacher, test)
    runners = {"teacher": ort_session(teacher, x, args.threads, folder, f"{name}_teacher")}
    for s in result.solutions:   # only the main budget's student is fine-tuned
        student = result.student if s.budget == result.budget else result.for_budget(s.budget)
        runners[f"b{s.budget:.2f}"] = ort_session(student, x, args.threads, folder, f"{name}_b{s.budget:.2f}")
    medians = interleaved_medians(runners, args.runs, args.warmup)
    rows = []
    for s in result.solutions:
        s.measured_latency_s = medians[f"b{s.budget:.2f}"]
        rows.append((s, medians["teacher"], teacher_acc))
    pareto_plot(result.solutions, os.path.join(args.results, f"substitute_{name}.png"),
                title=f"digits {name}: onnxruntime latency against accuracy")
    lines = [f"### digits {name}", "",
             f"teacher: {medians['teacher'] * 1e3:.3f} ms measured, accuracy {teacher_acc * 100:.2f}%; "
             f"search (distillation + pricing + all budgets) {search_s:.0f} s; cost model `{args.cost}`", "",
             "| budget | predicted ms | measured ms | predicted/measured | speedup | accuracy | loss (pts) | sites "
             "replaced |", "|---|---|---|---|---|---|---|---|"]
    for s, teacher_s, acc in rows:
        lines.append(f"| {s.budget:.2f} | {s.predicted_latency_s * 1e3:.3f} | {s.measured_latency_s * 1e3:.3f} | "
                     f"{s.predicted_latency_s / s.measured_latency_s:.2f} | {teacher_s / s.measured_latency_s:.2f}x | "
                     f"{s.accuracy * 100:.2f}% | {(acc - s.accuracy) * 100:+.2f} | "
                     f"{sum(c != 'teacher' for c in s.choice.values())}/{len(s.choice)} |")
    lines += ["", "Chosen at the main budget:", "", result.report(), ""]
    return "\n".join(lines), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="mobilenet,resnet")
    parser.add_argument("--budgets", default="0.3,0.4,0.5,0.7,1.0")
    parser.add_argument("--families", default=None, help="comma list of candidate families (default all)")
    parser.add_argument("--cost", default="measured:cpu-onnxruntime")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--run-dir", default=os.path.join(tempfile.gettempdir(), "hant-bench-substitute"))
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quick", action="store_true", help="few families and steps: a smoke run in minutes")
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        args.families = args.families or "identity,conv,dws,svd"
        args.steps, args.runs, args.finetune_epochs = min(args.steps, 40), min(args.runs, 50), min(args.finetune_epochs, 1)
    args.families = args.families.split(",") if args.families else None
    torch.set_num_threads(args.threads)
    os.makedirs(args.results, exist_ok=True)

    sections = ["# Operator substitution on the digits teachers", "",
                environment_line(args.threads, 1) + ".", "",
                f"Families: {', '.join(args.families) if args.families else 'all'}; {args.steps} distillation steps "
                f"per candidate on {args.calibration_batches} calibration batches of 64; main budget "
                f"{args.budgets[0]} fine-tuned {args.finetune_epochs} epoch(s) with KD. Latency medians of "
                f"{args.runs} interleaved runs.", ""]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.teachers.split(","):
            text, _ = bench_teacher(name, args, folder)
            sections.append(text)
    ilp_s = ilp_timing()
    sections += ["## Integer program", "", f"100 sites x 200 candidates, multiple-choice knapsack with HiGHS: "
                 f"median {ilp_s * 1e3:.0f} ms per solve (5 random instances).", ""]
    path = os.path.join(args.results, "substitute.md")
    with open(path, "w") as handle:
        handle.write("\n".join(sections))
    print("\n".join(sections))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
