"""``hant linearize MODEL --data digits``: remove nonlinearities, fold, fine-tune with distillation, save.

MODEL is ``digits:mobilenet`` / ``digits:resnet`` (the bundled teachers, trained and cached
on first use) or any spec :func:`hant.tools.models.load_model` reads (then give ``--input``
with 1 channel at 32x32, the digits shape). The flow: :func:`hant.passes.remove_nonlinearity.linearize`
under ``--budget`` (max total importance: KL of the logits) or ``--latency-target`` (fraction
of the folded baseline latency), then ``--epochs`` of distillation from the original
(``--order before``: fine-tune the linearised network, then merge its chains exactly;
``--order after``: fine-tune the merged network), checkpointed in ``--checkpoint-dir`` and
resumed after a kill. Test accuracy is printed before and after; ``--out`` saves the student
(``.onnx`` via :func:`hant.export_onnx`, else ``torch.save`` of the module).
"""

from __future__ import annotations

import argparse

import torch

from hant.cost_models import get as get_cost_model
from hant.errors import InputError
from hant.passes.distill import finetune
from hant.passes.remove_nonlinearity import MODES, fold_chains, linearize
from hant.tools import digits
from hant.tools.models import load_model, save_module

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``linearize`` subcommand."""
    p = subparsers.add_parser(
        "linearize", help="remove nonlinearities under a budget, fold conv chains, fine-tune with distillation",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("model", metavar="MODEL", help="digits:mobilenet, digits:resnet, or a model spec")
    p.add_argument("--data", default="digits", choices=["digits"], help="training/test data (default digits)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget", type=float, help="max total importance (KL of the logits) of removed units")
    goal.add_argument("--latency-target", type=float, metavar="FRACTION",
                      help="predicted latency at most this fraction of the folded baseline, e.g. 0.6")
    p.add_argument("--mode", choices=MODES, default="ilp", help="selection: integer program or greedy re-scoring")
    p.add_argument("--cost", default="roofline:cpu", metavar="SPEC",
                   help="cost-model spec (default roofline:cpu); give the target's, e.g. measured:cpu-onnxruntime: "
                        "at batch 1 on small inputs latency is per-op overhead, which an analytical model misses")
    p.add_argument("--no-relocate", action="store_true", help="merge only chains that fold exactly")
    p.add_argument("--calib-batches", type=int, default=2, help="64-image training batches for scoring (default 2)")
    p.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (0: none; default 15, seconds each "
                                                          "on digits)")
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate (default 2e-3)")
    p.add_argument("--order", choices=["before", "after"], default="before",
                   help="fine-tune before merging the chains (default: it recovered more accuracy in "
                        "benchmarks/linearize.py) or after")
    p.add_argument("--max-steps", type=int, help="stop fine-tuning after this many steps (quick runs)")
    p.add_argument("--checkpoint-dir", help="fine-tuning checkpoints (resumed when present)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", help="where to save the student: FILE.onnx or FILE.pt")
    p.add_argument("--report", metavar="FILE.md", help="write the unit table as markdown")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the flow; print the report and accuracies; return 0."""
    if args.calib_batches < 1 or args.epochs < 0:
        raise InputError("--calib-batches must be >= 1 and --epochs >= 0")
    torch.set_num_threads(args.threads)
    teacher = load_model(args.model).module.eval()
    train_loader, test_loader = digits.loaders(64)
    data = digits.load_data()
    calib = [data.train_x[i * 64:(i + 1) * 64] for i in range(args.calib_batches)]
    example = data.test_x[:1]
    cost = get_cost_model(args.cost)
    result = linearize(teacher, example, calib, budget=args.budget, latency_target=args.latency_target,
                       mode=args.mode, cost=cost, relocate_padding=not args.no_relocate)
    print(result.report)
    acc_teacher = digits.evaluate(teacher, test_loader)
    acc_student = digits.evaluate(result.module, test_loader)
    student = result.module
    if args.epochs and result.report.chosen:
        tuned = result.linearised if args.order == "before" else result.module
        tuned = finetune(tuned, teacher, train_loader, epochs=args.epochs, lr=args.lr,
                         checkpoint_dir=args.checkpoint_dir, max_steps=args.max_steps)
        student = fold_chains(tuned, cost, relocate_padding=not args.no_relocate, check_inputs=(example,)) \
            if args.order == "before" else tuned
    acc_final = digits.evaluate(student, test_loader)
    print(f"test accuracy: teacher {acc_teacher:.2%}, linearised {acc_student:.2%}, "
          f"after fine-tuning ({args.order} merge) {acc_final:.2%}")
    if args.report:
        with open(args.report, "w") as f:
            f.write(result.report.to_markdown() + "\n\n" + f"test accuracy: teacher {acc_teacher:.4f}, linearised "
                    f"{acc_student:.4f}, fine-tuned {acc_final:.4f}\n")
    if args.out:
        print(f"student written to {save_module(student.eval(), (example,), args.out)}")
    return 0
