"""Follow-up of benchmarks/linearize.py: the ILP 0.73 student with the head's activation removed too.

fold_linear now folds classifier heads (last conv -> global pool -> flatten -> Linear becomes one
Linear), so removing the head's ReLU6 on top of the ILP 0.73 selection deletes two more kernels.
This script fine-tunes that student (tune, then merge; the benchmark's settings), folds it,
evaluates it on the digits test split and times it against the teacher in interleaved
onnxruntime rounds. Checkpoints resume.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/linearize_head.py --seeds 0 --train-only
    python benchmarks/linearize_head.py --seeds 0,1 --out benchmarks/results/linearize_head.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile

import torch
from tabulate import tabulate

import hant
from hant.cost_models import get
from hant.graphs import activation_of
from hant.passes import PassManager
from hant.passes.remove_nonlinearity import fold_chains, linearise
from hant.tools import digits

from common import environment_line, interleaved_rounds, ort_session

ILP_073 = ("features_0_2", "features_1_conv_2", "features_2_conv_2", "features_2_conv_5", "features_3_conv_2",
           "features_3_conv_5", "features_4_conv_2", "features_4_conv_5", "features_5_conv_2", "features_5_conv_5",
           "features_6_conv_2", "features_6_conv_5")
HEAD = ("features_7_2",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--checkpoints", default="runs/linearize/headfold")
    parser.add_argument("--ilp-checkpoints", default="runs/linearize/longer",
                        help="linearize.py --checkpoints of its focused ILP 0.73 run (reused, or trained here)")
    parser.add_argument("--cost", default="measured:cpu-onnxruntime,threads=1,samples=3,"
                                          "db=runs/linearize/headfold/latency.sqlite")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    teacher = digits.teacher("mobilenet", progress=False).eval()
    data = digits.load_data()
    _, test = digits.loaders(64, data=data)
    example = data.test_x[:1]
    cost = get(args.cost)
    gm = hant.trace(teacher, (example,))
    assert {a for a in ILP_073 + HEAD} <= {n.name for n in gm.graph.nodes if activation_of(n) is not None}
    acc_teacher = digits.evaluate(teacher, test)
    variants = {"teacher": (PassManager("exact", cost=None, check=None)(gm).graph_module, acc_teacher)}
    for label, acts in (("ILP 0.73", ILP_073), ("ILP 0.73 + head", ILP_073 + HEAD))[1 if args.train_only else 0:]:
        linear = linearise(gm, acts)
        for seed in (int(s) for s in args.seeds.split(",")):
            train, _ = digits.loaders(64, data=data, seed=seed)
            torch.manual_seed(seed)
            # the ILP 0.73 students are linearize.py's (its focused run's checkpoints); the head ones are new
            folder = (os.path.join(args.checkpoints, f"head_e{args.epochs}" + (f"_s{seed}" if seed else ""))
                      if HEAD[0] in acts else
                      os.path.join(args.ilp_checkpoints, f"ilp0.73_before_e{args.epochs}" + (f"_s{seed}" if seed else "")))
            tuned = hant.finetune(copy.deepcopy(linear), teacher, train, epochs=args.epochs, lr=args.lr,
                                  checkpoint_dir=folder, progress=False)
            student = fold_chains(tuned, cost, check_inputs=(example,))
            acc = digits.evaluate(student, test)
            print(f"{label} seed {seed}: accuracy {acc:.4f}", flush=True)
            variants[f"{label}, seed {seed}"] = (student, acc)
    if args.train_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: ort_session(module, example, 1, tmp, f"v{i}") for i, (name, (module, _)) in
                    enumerate(variants.items())}
        wall = interleaved_rounds(sessions, args.rounds, 20, args.calls)["wall"]
    base = statistics.median(wall["teacher"])
    rows = [[name, f"{100 * acc:.1f}", f"{100 * (acc - acc_teacher):+.1f}", f"{statistics.median(wall[name]) * 1e6:.0f}",
             f"{base / statistics.median(wall[name]):.2f}"] for name, (_, acc) in variants.items()]
    table = tabulate(rows, headers=["student", "test accuracy %", "vs teacher (points)", "onnxruntime median us",
                                    "speedup"], tablefmt="github")
    text = (f"# Nonlinearity removal with the classifier head folded\n\n{environment_line(1, 1)}; {args.rounds} "
            f"interleaved rounds x {args.calls} calls, medians. Fine-tuning: tune, then merge, {args.epochs} epochs "
            f"(KD T=4, alpha 0.9, AdamW lr {args.lr}); test accuracy on the 359 digits test images.\n\n{table}\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
