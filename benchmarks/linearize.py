"""Nonlinearity removal on the digits MobileNetV2-like teacher, measured under onnxruntime (CPU, batch 1).

Units are priced with the target's own runtime (``measured:cpu-onnxruntime``: the whole
folded graph timed, one thread), never with an analytical model: at 32x32 and batch 1 the
latency is per-op overhead, which only measurement sees. For each latency target and
selection mode (ILP on additive scores; greedy re-scoring after every pick): units removed,
test accuracy of the linearised student before and after distillation fine-tuning in both
orders (fine-tune, then merge / merge, then fine-tune), the cost model's figure for the
final graph, measured onnxruntime latency and speedup against the teacher (both exported
the same way, BN folded by onnx-simplifier/onnxruntime); ILP against greedy on the same
targets; and the latency-only curve of torchvision mobilenet_v2 at 224x224.

Timing: 1 torch thread, onnxruntime with 1 intra-op and 1 inter-op thread, all models of a
table timed interleaved (round robin, ``ROUNDS`` rounds of ``RUNS`` runs each), medians
reported. Writes ``benchmarks/results/linearize.md``. Usage:
``python benchmarks/linearize.py [--quick] [--cost SPEC]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import onnxruntime as ort
import torch
from tabulate import tabulate

import hant
from hant.cost_models import get as get_cost_model
from hant.graphs.export import export_onnx
from hant.passes.remove_nonlinearity import fold_chains
from hant.tools import digits

RESULTS = os.path.join(os.path.dirname(__file__), "results", "linearize.md")
# The target's runtime prices every unit (whole folded graph, measured). Its own store: a
# measurement taken while the shared machine was busy is never re-timed once stored.
DEFAULT_COST = "measured:cpu-onnxruntime,threads=1,db=runs/linearize/latency.sqlite"


def ort_session(module: torch.nn.Module, example: torch.Tensor, path: str) -> ort.InferenceSession:
    export_onnx(module.eval(), example, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict[str, ort.InferenceSession], example: torch.Tensor, rounds: int,
                     runs: int) -> dict[str, float]:
    """Median seconds per run of each session, timed round robin."""
    feed = {name: {s.get_inputs()[0].name: example.numpy()} for name, s in sessions.items()}
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():          # warm-up
        for _ in range(5):
            s.run(None, feed[name])
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feed[name])
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in samples.items()}


def digits_table(args, cost, tmp: str) -> tuple[str, str]:
    teacher = digits.teacher("mobilenet")
    train, test = digits.loaders(64)
    data = digits.load_data()
    example = data.test_x[:1]
    calib = [data.train_x[:128]]
    acc_teacher = digits.evaluate(teacher, test)
    sessions = {"teacher": ort_session(teacher, example, os.path.join(tmp, "teacher.onnx"))}
    rows, greedy_rows = [], []
    order_wins = {"before": 0, "after": 0}
    results: dict[tuple[str, float], object] = {}
    configs = [("ilp", t) for t in args.targets] + [("greedy", t) for t in args.greedy_targets]
    for mode, target in configs:
        start = time.perf_counter()
        try:
            res = hant.linearize(teacher, example, calib, latency_target=target, cost=cost, mode=mode,
                                 progress=False)
        except hant.HantError as exc:
            print(f"{mode} {target}: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - start
        rep = res.report
        acc_lin = digits.evaluate(res.module, test)
        results[(mode, target)] = (res, seconds, acc_lin)      # before fine-tuning, which trains res.module in place
        accs = {}
        for order in ("before", "after"):
            torch.manual_seed(0)
            if order == "before":
                tuned = hant.finetune(res.linearised, teacher, train, epochs=args.epochs, lr=args.lr, progress=False)
                student = fold_chains(tuned, cost, check_inputs=(example,))
            else:
                student = hant.finetune(res.module, teacher, train, epochs=args.epochs, lr=args.lr, progress=False)
            accs[order] = (digits.evaluate(student, test), student)
        best = max(accs, key=lambda o: accs[o][0])
        order_wins[best] += 1
        print(f"{mode} {target}: {len(res.removed)} activations removed in {seconds:.0f} s, accuracy linearised "
              f"{acc_lin:.4f}, tune-then-merge {accs['before'][0]:.4f}, merge-then-tune {accs['after'][0]:.4f}, "
              f"cost model final/baseline {rep.final_latency_s / rep.baseline_latency_s:.3f}", flush=True)
        name = f"{mode} {target:.2f}"
        sessions[name] = ort_session(accs[best][1], example, os.path.join(tmp, f"{mode}{target}.onnx"))
        units = "; ".join("+".join(u.activations) for u in rep.chosen)
        rows.append([name, len(rep.chosen), len(res.removed), units, f"{100 * acc_lin:.1f}",
                     f"{100 * accs['before'][0]:.1f}", f"{100 * accs['after'][0]:.1f}",
                     f"{rep.predicted_latency_s / rep.baseline_latency_s:.2f}",
                     f"{rep.final_latency_s / rep.baseline_latency_s:.2f}", f"{rep.relocation_drift:.2e}"])
    for target in sorted({t for m, t in results if m == "greedy"}):
        if ("ilp", target) not in results:
            continue
        (ilp, ilp_s, ilp_acc), (greedy, greedy_s, greedy_acc) = results[("ilp", target)], results[("greedy", target)]
        greedy_rows.append([f"{target:.2f}", f"{ilp.report.final_distortion:.3f}",
                            f"{greedy.report.final_distortion:.3f}", f"{100 * ilp_acc:.1f}", f"{100 * greedy_acc:.1f}",
                            f"{ilp.report.final_latency_s / ilp.report.baseline_latency_s:.2f}",
                            f"{greedy.report.final_latency_s / greedy.report.baseline_latency_s:.2f}",
                            f"{ilp_s:.0f}", f"{greedy_s:.0f}"])
    lat = time_interleaved(sessions, example, args.rounds, args.runs)
    table = [["teacher", 0, 0, "", f"{100 * acc_teacher:.1f}", "", "", "1.00", "1.00", "",
              f"{lat['teacher'] * 1e6:.0f}", "1.00"]]
    for row in rows:
        table.append(row + [f"{lat[row[0]] * 1e6:.0f}", f"{lat['teacher'] / lat[row[0]]:.2f}"])
    headers = ["model", "units", "activations removed", "units chosen", "acc. linearised %",
               "acc. fine-tuned (tune, then merge) %", "acc. fine-tuned (merge, then tune) %",
               "ILP predicted latency / baseline", "cost model, final graph / baseline", "relocation drift",
               "onnxruntime median us", "speedup"]
    print(f"better order per target: {order_wins}", flush=True)
    md = tabulate(table, headers=headers, tablefmt="github")
    greedy_md = ""
    if greedy_rows:
        greedy_md = tabulate(greedy_rows, headers=["latency target", "KL ilp", "KL greedy", "acc. ilp % (no tuning)",
                                                   "acc. greedy % (no tuning)", "ilp cost model final / baseline",
                                                   "greedy cost model final / baseline", "ilp seconds",
                                                   "greedy seconds"], tablefmt="github")
    return md, greedy_md


def torchvision_table(args, cost, tmp: str) -> str:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))]
    sessions = {"mobilenet_v2": ort_session(model, x, os.path.join(tmp, "mnv2.onnx"))}
    removed = {}
    for target in args.tv_targets:
        try:
            res = hant.linearize(model, x, calib, latency_target=target, cost=cost, progress=False, max_unit_size=2)
        except hant.HantError as exc:
            print(f"mobilenet_v2 target {target}: {exc}", flush=True)
            continue
        rep = res.report
        name = f"target {target:.2f}"
        sessions[name] = ort_session(res.module, x, os.path.join(tmp, f"mnv2_{target}.onnx"))
        useful = sum(u.gain_s > 0 for u in rep.units)
        removed[name] = (len(res.removed), f"{useful} / {len(rep.units)}", rep.predicted_latency_s /
                         rep.baseline_latency_s, rep.final_latency_s / rep.baseline_latency_s)
        print(f"mobilenet_v2 target {target}: {len(res.removed)} removed; units with gain: {useful}/{len(rep.units)}; "
              f"best units: {sorted(((round(u.gain_s * 1e6), u.activations) for u in rep.units), reverse=True)[:5]}",
              flush=True)
    lat = time_interleaved(sessions, x, max(2, args.rounds // 2), max(5, args.runs // 4))
    rows = [["mobilenet_v2", 0, "", "1.00", "1.00", f"{lat['mobilenet_v2'] * 1e3:.2f}", "1.00"]]
    for name, (n, units, pred, final) in removed.items():
        rows.append([name, n, units, f"{pred:.2f}", f"{final:.2f}", f"{lat[name] * 1e3:.2f}",
                     f"{lat['mobilenet_v2'] / lat[name]:.2f}"])
    return tabulate(rows, headers=["model", "activations removed", "units with gain > 0 / units",
                                   "ILP predicted latency / baseline", "cost model, final graph / baseline",
                                   "onnxruntime median ms", "speedup"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer targets, epochs and runs")
    parser.add_argument("--cost", default=DEFAULT_COST,
                        help=f"selection cost model (default {DEFAULT_COST}: the target's own runtime, in a "
                             "store of this benchmark's)")
    args = parser.parse_args()
    args.targets = (0.85,) if args.quick else (0.8, 0.73)
    args.tv_targets = (0.9,)
    args.epochs, args.lr = (8, 2e-3) if args.quick else (15, 2e-3)
    args.rounds, args.runs = (10, 20) if args.quick else (20, 50)
    args.greedy_targets = (0.85,) if args.quick else (0.8, 0.65)
    os.makedirs("runs/linearize", exist_ok=True)
    torch.set_num_threads(1)
    cost = get_cost_model(args.cost)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        digits_md, greedy_md = digits_table(args, cost, tmp)
        tv_md = torchvision_table(args, cost, tmp)
    text = (f"# Nonlinearity removal (benchmarks/linearize.py{' --quick' if args.quick else ''})\n\n"
            f"Run {time.strftime('%Y-%m-%d %H:%M')}. "
            f"Selection cost model `{args.cost}` (ILP, latency-target mode; a target is a fraction of the "
            f"BN-folded teacher's latency under that model); latency measured with onnxruntime "
            f"{ort.__version__} on this CPU, batch 1, 1 intra-op / 1 inter-op thread, {args.rounds} interleaved "
            f"rounds x {args.runs} runs, medians. Fine-tuning: {args.epochs} epochs of distillation (T=4, "
            f"alpha=0.9), AdamW lr {args.lr}; the faster of the two orders' students is the one timed. "
            f"Machine shared with other jobs: treat timings as indicative. Wall time {time.time() - start:.0f} s.\n\n"
            f"## Digits MobileNetV2-like teacher (1x1x32x32)\n\n{digits_md}\n\n"
            f"## ILP against greedy re-scoring (same targets, before fine-tuning)\n\n{greedy_md}\n\n"
            f"## torchvision mobilenet_v2, 1x3x224x224 (random weights: latency only)\n\n{tv_md}\n")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
