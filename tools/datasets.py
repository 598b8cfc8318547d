"""Data for the lossy subcommands: ``--data digits`` or a file of tensors.

A *task* bundles what a lossy pass needs from the user's data: a loader of calibration /
training batches, and, when labels are known, an ``evaluate(module) -> accuracy`` on held
out examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from hant.errors import InputError

__all__ = ["Task", "load_task", "DATA_HELP"]

DATA_HELP = ("'digits' (scikit-learn's bundled handwritten digits, 32x32, fixed split) or a torch.save'd file "
             "holding a tensor of inputs or a dict {'x': inputs, 'y': labels} (labels enable accuracy; "
             "the last fifth is held out for it)")


@dataclass
class Task:
    train: DataLoader
    evaluate: Callable[[torch.nn.Module], float] | None
    name: str


def _accuracy(loader: DataLoader) -> Callable[[torch.nn.Module], float]:
    @torch.no_grad()
    def evaluate(module: torch.nn.Module) -> float:
        correct = total = 0
        for x, y in loader:
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
        return correct / total
    return evaluate


def load_task(spec: str, batch_size: int = 64, seed: int = 0) -> Task:
    """The task ``spec`` names (see :data:`DATA_HELP`); :class:`InputError` for anything else."""
    if spec == "digits":
        from hant.tools import digits

        train, test = digits.loaders(batch_size, seed=seed)
        return Task(train, lambda m: digits.evaluate(m, test), "digits")
    if not os.path.isfile(spec):
        raise InputError(f"data {spec!r} is neither 'digits' nor a file; give {DATA_HELP}")
    try:
        saved = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read data file {spec!r}: {exc}") from exc
    x, y = (saved.get("x"), saved.get("y")) if isinstance(saved, dict) else (saved, None)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) < 2:
        raise InputError(f"data file {spec!r} must hold a tensor of at least 2 inputs, or a dict with 'x'")
    if y is None:
        loader = DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)
        return Task(_Unwrap(loader), None, os.path.basename(spec))
    if not isinstance(y, torch.Tensor) or len(y) != len(x):
        raise InputError(f"data file {spec!r}: 'y' must be a tensor with one label per input")
    held = max(1, len(x) // 5)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[:-held], y[:-held]), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x[-held:], y[-held:]), batch_size=256)
    return Task(train, _accuracy(test), os.path.basename(spec))


class _Unwrap:
    """A loader of 1-tuples seen as a loader of tensors."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self):
        return (batch[0] for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)
