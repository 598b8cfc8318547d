"""Follow-up of benchmarks/linearize.py: the ILP 0.73 student with the head's activation removed too.

fold_linear now folds classifier heads (last conv -> global pool -> flatten -> Linear becomes one
Linear), so removing the head's ReLU6 on top of a selection (``--selection``: the ILP 0.73 or greedy 0.70
one of linearize.py's focused run) deletes two more kernels.
This script fine-tunes that student (``--order before``: tune, then merge, the benchmark's
default; ``after``: merge, then tune the merged network), folds it,
evaluates it on the digits test split and times it against the teacher in interleaved
onnxruntime rounds. Checkpoints resume.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/linearize_head.py --seeds 0 --train-only
    python benchmarks/linearize_head.py --seeds 0,1 --out benchmarks/results/linearize_head.md
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from tabulate import tabulate

import hant
from hant.cost_models import get
from hant.graphs import activation_of
from hant.passes import PassManager
from hant.passes.remove_nonlinearity import fold_chains, linearise, prepare_for_tuning
from hant.tools import digits

from common import environment_line, interleaved_medians, ort_session

ILP_073 = ("features_0_2", "features_1_conv_2", "features_2_conv_2", "features_2_conv_5", "features_3_conv_2",
           "features_3_conv_5", "features_4_conv_2", "features_4_conv_5", "features_5_conv_2", "features_5_conv_5",
           "features_6_conv_2", "features_6_conv_5")
GREEDY_070 = tuple(a for block in range(2, 7) for a in (f"features_{block}_conv_2", f"features_{block}_conv_5"))
SELECTIONS = {"ilp0.73": ("ILP 0.73", ILP_073), "greedy0.70": ("greedy 0.70", GREEDY_070)}
HEAD = ("features_7_2",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", default="ilp0.73", choices=tuple(SELECTIONS),
                        help="linearize.py's selection the head's activation is added to")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--checkpoints", default="runs/linearize/headfold")
    parser.add_argument("--selection-checkpoints", default="runs/linearize/longer",
                        help="linearize.py --checkpoints of its focused run (students without the head: reused, or "
                             "trained here)")
    parser.add_argument("--cost", default="measured:cpu-onnxruntime,threads=1,samples=3,"
                                          "db=runs/linearize/headfold/latency.sqlite")
    parser.add_argument("--order", default="before", choices=("before", "after"),
                        help="fine-tune before merging (DepthShrinker's order) or merge, then fine-tune the merged net")
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
    label, selection = SELECTIONS[args.selection]
    assert set(selection + HEAD) <= {n.name for n in gm.graph.nodes if activation_of(n) is not None}
    acc_teacher = digits.evaluate(teacher, test)
    variants = {"teacher": (PassManager("exact", cost=None, check=None)(gm).graph_module, acc_teacher)}
    for label, acts in ((label, selection), (f"{label} + head", selection + HEAD))[1 if args.train_only else 0:]:
        linear = prepare_for_tuning(linearise(gm, acts), cost, (example,))   # as linearize.py's students
        for seed in (int(s) for s in args.seeds.split(",")):
            train, _ = digits.loaders(64, data=data, seed=seed)
            torch.manual_seed(seed)
            # the students without the head are linearize.py's (its focused run's checkpoints); the head ones are new
            suffix = f"_e{args.epochs}" + (f"_s{seed}" if seed else "")
            folder = (os.path.join(args.checkpoints, f"{args.selection}_head{suffix}") if HEAD[0] in acts else
                      os.path.join(args.selection_checkpoints, f"{args.selection}_before{suffix}"))
            if args.order == "before" or HEAD[0] not in acts:
                tuned = hant.finetune(copy.deepcopy(linear), teacher, train, epochs=args.epochs, lr=args.lr,
                                      checkpoint_dir=folder, progress=False)
                student = fold_chains(tuned, cost, check_inputs=(example,))
            else:
                merged = fold_chains(linear, cost, check_inputs=(example,))
                student = hant.finetune(merged, teacher, train, epochs=args.epochs, lr=args.lr,
                                        checkpoint_dir=folder + "_after", progress=False)
            acc = digits.evaluate(student, test)
            order = args.order if HEAD[0] in acts else "before"
            print(f"{label} seed {seed} ({order}): accuracy {acc:.4f}", flush=True)
            variants[f"{label}, {'tune, then merge' if order == 'before' else 'merge, then tune'}, seed {seed}"] = \
                (student, acc)
    if args.train_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: ort_session(module, example, 1, tmp, f"v{i}") for i, (name, (module, _)) in
                    enumerate(variants.items())}
        seconds = interleaved_medians(sessions, args.rounds, 20, args.calls)
    rows = [[name, f"{100 * acc:.1f}", f"{100 * (acc - acc_teacher):+.1f}", f"{seconds[name] * 1e6:.0f}",
             f"{seconds['teacher'] / seconds[name]:.2f}"] for name, (_, acc) in variants.items()]
    table = tabulate(rows, headers=["student", "test accuracy %", "vs teacher (points)", "onnxruntime median us",
                                    "speedup"], tablefmt="github")
    text = (f"# Nonlinearity removal with the classifier head folded\n\n{environment_line(1, 1)}; {args.rounds} "
            f"interleaved rounds x {args.calls} calls, medians. Fine-tuning: {args.epochs} epochs "
            f"(KD T=4, alpha 0.9, AdamW lr {args.lr}); test accuracy on the 359 digits test images.\n\n{table}\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
