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
``python benchmarks/linearize.py [--quick] [--cost SPEC]``. A focused follow-up (chosen
targets and modes, several fine-tuning lengths, one interleaved timing run):
``python benchmarks/linearize.py --targets 0.73,0.70 [--greedy-targets 0.70] --epochs 30,45``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile
import time

import onnxruntime as ort
import torch
from tabulate import tabulate

import hant
from hant.cost_models import get as get_cost_model
from hant.passes.remove_nonlinearity import fold_chains
from hant.tools import digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, ort_session  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "linearize.md")
# The target's runtime prices every unit (whole folded graph, measured). Its own store: a
# measurement taken while the shared machine was busy is never re-timed once stored.
DEFAULT_COST = "measured:cpu-onnxruntime,threads=1,db=runs/linearize/latency.sqlite"


def linearize_or_report(teacher, example, calib, mode: str, target: float, cost):
    """``hant.linearize`` at one latency target, or None (the reason printed) when it cannot be met."""
    try:
        return hant.linearize(teacher, example, calib, latency_target=target, cost=cost, mode=mode, progress=False)
    except hant.HantError as exc:
        print(f"{mode} {target}: {exc}", flush=True)
        return None


def time_interleaved(runners: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median seconds per run of each onnxruntime runner: ``rounds`` round-robin rounds of ``runs`` calls each."""
    return interleaved_medians(runners, rounds, warmup=5, calls_per_round=runs)


def digits_table(args, cost, tmp: str) -> tuple[str, str]:
    teacher = digits.teacher("mobilenet")
    train, test = digits.loaders(64)
    data = digits.load_data()
    example = data.test_x[:1]
    calib = [data.train_x[:128]]
    acc_teacher = digits.evaluate(teacher, test)
    sessions = {"teacher": ort_session(teacher, example, 1, tmp, "teacher")}
    rows, greedy_rows = [], []
    order_wins = {"before": 0, "after": 0}
    results: dict[tuple[str, float], object] = {}
    configs = [("ilp", t) for t in args.targets] + [("greedy", t) for t in args.greedy_targets]
    for mode, target in configs:
        start = time.perf_counter()
        res = linearize_or_report(teacher, example, calib, mode, target, cost)
        if res is None:
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
        sessions[name] = ort_session(accs[best][1], example, 1, tmp, f"{mode}{target}")
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
    lat = time_interleaved(sessions, args.rounds, args.runs)
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


def _target_name(target: float) -> str:
    return f"{target:.2f}" if round(target, 2) == target else f"{target:g}"


def focused_table(args, cost, tmp: str) -> str:
    """Chosen targets and modes only, each student fine-tuned for every ``args.epoch_list`` value.

    One selection per (mode, target); per epoch count, order (``args.orders``) and seed
    (``args.seeds``) one distillation run from the same linearised network (fresh loader
    shuffled with the seed, ``torch.manual_seed(seed)``), checkpointed under
    ``args.checkpoints``: a killed run resumes, and a run after
    ``--train-only`` loads the finished students instead of retraining them. Unless
    ``args.train_only``, all students and the teacher are then timed interleaved in one
    onnxruntime run.
    """
    teacher = digits.teacher("mobilenet")
    data = digits.load_data()
    _, test = digits.loaders(64, data=data)
    example = data.test_x[:1]
    calib = [data.train_x[:128]]
    acc_teacher = digits.evaluate(teacher, test)
    sessions = {"teacher": ort_session(teacher, example, 1, tmp, "teacher")}
    rows = []
    configs = [("ilp", t) for t in args.targets] + [("greedy", t) for t in args.greedy_targets]
    for mode, target in configs:
        res = linearize_or_report(teacher, example, calib, mode, target, cost)
        if res is None:
            continue
        rep = res.report
        acc_lin = digits.evaluate(res.module, test)
        units = "; ".join("+".join(u.activations) for u in rep.chosen)
        print(f"{mode} {target}: {len(res.removed)} activations removed ({units}), "
              f"accuracy linearised {acc_lin:.4f}", flush=True)
        for epochs, order, seed in itertools.product(args.epoch_list, args.orders, args.seeds):
            start = time.perf_counter()
            train, _ = digits.loaders(64, data=data, seed=seed)
            tag = f"{mode}{_target_name(target)}_{order}_e{epochs}" + (f"_s{seed}" if seed else "")
            ckpt = os.path.join(args.checkpoints, tag)
            torch.manual_seed(seed)
            if order == "before":
                tuned = hant.finetune(copy.deepcopy(res.linearised), teacher, train, epochs=epochs, lr=args.lr,
                                      checkpoint_dir=ckpt, progress=False)
                student = fold_chains(tuned, cost, check_inputs=(example,))
            else:
                student = hant.finetune(copy.deepcopy(res.module), teacher, train, epochs=epochs, lr=args.lr,
                                        checkpoint_dir=ckpt, progress=False)
            acc = digits.evaluate(student, test)
            name = f"{mode} {_target_name(target)} {order} e{epochs} seed {seed}"
            print(f"{name}: accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if not args.train_only:
                sessions[name] = ort_session(student, example, 1, tmp, f"{tag}")
            rows.append([_target_name(target), mode, {"before": "tune, then merge", "after": "merge, then tune"}[order],
                         epochs, seed, len(res.removed), f"{100 * acc_lin:.1f}", f"{100 * acc:.1f}",
                         f"{100 * (acc - acc_teacher):+.1f}", name])
    if args.train_only:
        return ""
    lat = time_interleaved(sessions, args.rounds, args.runs)
    table = [["1.00", "teacher", "", "", "", 0, "", f"{100 * acc_teacher:.1f}", "",
              f"{lat['teacher'] * 1e6:.0f}", "1.00"]]
    for *row, name in rows:
        table.append(row + [f"{lat[name] * 1e6:.0f}", f"{lat['teacher'] / lat[name]:.2f}"])
    return tabulate(table, headers=["latency target", "mode", "order", "epochs", "seed", "activations removed",
                                    "acc. linearised %", "acc. fine-tuned %", "vs teacher (points)",
                                    "onnxruntime median us", "speedup"], tablefmt="github")


def torchvision_table(args, cost, tmp: str) -> str:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))]
    sessions = {"mobilenet_v2": ort_session(model, x, 1, tmp, "mnv2")}
    removed = {}
    for target in args.tv_targets:
        try:
            res = hant.linearize(model, x, calib, latency_target=target, cost=cost, progress=False, max_unit_size=2)
        except hant.HantError as exc:
            print(f"mobilenet_v2 target {target}: {exc}", flush=True)
            continue
        rep = res.report
        name = f"target {target:.2f}"
        sessions[name] = ort_session(res.module, x, 1, tmp, f"mnv2_{target}")
        useful = sum(u.gain_s > 0 for u in rep.units)
        removed[name] = (len(res.removed), f"{useful} / {len(rep.units)}", rep.predicted_latency_s /
                         rep.baseline_latency_s, rep.final_latency_s / rep.baseline_latency_s)
        print(f"mobilenet_v2 target {target}: {len(res.removed)} removed; units with gain: {useful}/{len(rep.units)}; "
              f"best units: {sorted(((round(u.gain_s * 1e6), u.activations) for u in rep.units), reverse=True)[:5]}",
              flush=True)
    lat = time_interleaved(sessions, max(2, args.rounds // 2), max(5, args.runs // 4))
    rows = [["mobilenet_v2", 0, "", "1.00", "1.00", f"{lat['mobilenet_v2'] * 1e3:.2f}", "1.00"]]
    for name, (n, units, pred, final) in removed.items():
        rows.append([name, n, units, f"{pred:.2f}", f"{final:.2f}", f"{lat[name] * 1e3:.2f}",
                     f"{lat['mobilenet_v2'] / lat[name]:.2f}"])
    return tabulate(rows, headers=["model", "activations removed", "units with gain > 0 / units",
                                   "ILP predicted latency / baseline", "cost model, final graph / baseline",
                                   "onnxruntime median ms", "speedup"], tablefmt="github")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer targets, epochs and runs")
    parser.add_argument("--cost", default=DEFAULT_COST,
                        help=f"selection cost model (default {DEFAULT_COST}: the target's own runtime, in a "
                             "store of this benchmark's)")
    parser.add_argument("--targets", type=_floats, default=None,
                        help="focused run: ILP latency targets only, e.g. 0.73,0.70 (skips the full tables)")
    parser.add_argument("--greedy-targets", type=_floats, default=None,
                        help="focused run: greedy latency targets, e.g. 0.70 (default none in a focused run)")
    parser.add_argument("--epochs", default=None,
                        help="fine-tuning epochs; in a focused run a list, e.g. 30,45 (full run default 15)")
    parser.add_argument("--orders", default="before",
                        help="focused run: 'before' (tune, then merge), 'after' (merge, then tune) or both, "
                             "comma separated (default before)")
    parser.add_argument("--seeds", default="0",
                        help="focused run: fine-tuning seeds (torch and loader shuffling), e.g. 0,1,2 (default 0)")
    parser.add_argument("--checkpoints", default="runs/linearize/focused",
                        help="focused run: fine-tuning checkpoints, one folder per student (resumed)")
    parser.add_argument("--train-only", action="store_true",
                        help="focused run: fine-tune and evaluate, no timing (run again without it to time)")
    parser.add_argument("--out", default=None,
                        help="markdown output (default benchmarks/results/linearize.md for the full run, "
                             "runs/linearize/focused.md for a focused one)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 20, quick 10)")
    parser.add_argument("--runs", type=int, default=None, help="runs per model per round (default 50, quick 20)")
    args = parser.parse_args()
    os.makedirs("runs/linearize", exist_ok=True)
    torch.set_num_threads(1)
    cost = get_cost_model(args.cost)
    start = time.time()
    args.lr = 2e-3
    args.rounds = args.rounds or (10 if args.quick else 20)
    args.runs = args.runs or (20 if args.quick else 50)
    if args.targets is not None or args.greedy_targets is not None:
        args.targets = args.targets or ()
        args.greedy_targets = args.greedy_targets or ()
        args.epoch_list = tuple(int(v) for v in (args.epochs or "15").split(","))
        args.orders = tuple(o for o in args.orders.split(",") if o)
        args.seeds = tuple(int(v) for v in args.seeds.split(",") if v)
        if not set(args.orders) <= {"before", "after"}:
            parser.error("--orders takes 'before' and/or 'after'")
        out = args.out or "runs/linearize/focused.md"
        with tempfile.TemporaryDirectory() as tmp:
            md = focused_table(args, cost, tmp)
        if args.train_only:
            return
        text = (f"Focused run {time.strftime('%Y-%m-%d %H:%M')}: ILP targets {args.targets}, greedy targets "
                f"{args.greedy_targets}, epochs {args.epoch_list}, orders {args.orders}, seeds {args.seeds}. "
                f"Selection cost model `{args.cost}`; latency: onnxruntime {ort.__version__}, CPU, batch 1, "
                f"1 intra-op / 1 inter-op thread, {args.rounds} interleaved rounds x {args.runs} runs, medians. "
                f"Fine-tuning: distillation "
                f"(T=4, alpha=0.9), AdamW lr {args.lr}, cosine schedule over the run's epochs. Wall time "
                f"{time.time() - start:.0f} s.\n\n{md}\n")
        with open(out, "w") as f:
            f.write(text)
        print(text)
        return
    args.targets = (0.85,) if args.quick else (0.8, 0.73)
    args.tv_targets = (0.9,)
    if args.epochs and not args.epochs.isdigit():
        parser.error("the full run takes one --epochs value; give --targets or --greedy-targets for a list")
    args.epochs = int(args.epochs) if args.epochs else (8 if args.quick else 15)
    args.greedy_targets = (0.85,) if args.quick else (0.8, 0.65)
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
    os.makedirs(os.path.dirname(args.out or RESULTS), exist_ok=True)
    with open(args.out or RESULTS, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
