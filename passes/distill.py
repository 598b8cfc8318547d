"""Fine-tuning with knowledge distillation, resumable, for the lossy passes.

A lossy pass (nonlinearity removal, operator substitution) hands back a student that is
close to, but not the same as, the teacher. :func:`finetune` trains the student to match
the teacher's softened logits (Hinton et al.), optionally mixed with the hard-label loss:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

Work is saved after every epoch in ``checkpoint_dir`` (student and optimizer state, the
scheduler, the epoch, and the random-number state of torch and of the loader's sampler),
atomically. A run that was killed resumes from its last finished epoch and ends with the
same weights as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hant.errors import InputError

__all__ = ["finetune", "distillation_loss", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "finetune.pt"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """The distillation objective above. ``labels`` may be None only when ``alpha == 1``."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)
    if alpha >= 1.0:
        return soft
    if labels is None:
        raise InputError("the loader gives no labels; set alpha=1.0 to distil from the teacher alone")
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise InputError("the loader must yield tensors or (inputs, labels) tuples")


def _loader_generator(loader: Iterable) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    if gen is None:
        gen = getattr(getattr(loader, "sampler", None), "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)   # atomic: a kill never leaves a half-written checkpoint


def _layout(state: dict) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names with their shapes: what a checkpoint must share with the student."""
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def finetune(student: nn.Module, teacher: nn.Module, loader: Iterable, *, epochs: int = 1, lr: float = 1e-3,
             temperature: float = 4.0, alpha: float = 0.9, weight_decay: float = 0.0,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, max_steps: int | None = None,
             progress: bool = True) -> nn.Module:
    """Train ``student`` in place to imitate ``teacher`` on ``loader``; return ``student`` in eval mode.

    ``loader`` yields input tensors or ``(inputs, labels)``; labels are used by the hard-label
    term when ``alpha < 1``. AdamW with a cosine learning-rate schedule over
    ``epochs * len(loader)`` steps (or ``max_steps``, which also stops training early: use it
    for short CI runs). The teacher is never modified (a frozen copy runs in eval mode).

    With ``checkpoint_dir``, a checkpoint is written after every epoch; with ``resume`` (the
    default) a matching checkpoint there is loaded first and training continues after its
    epoch. A checkpoint written with other settings, or for a network with other parameter
    names or shapes, raises :class:`InputError` instead of being mixed in.
    """
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise InputError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise InputError("the student has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    settings = {"epochs": epochs, "lr": lr, "temperature": temperature, "alpha": alpha,
                "weight_decay": weight_decay, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch}
    sampler_gen = _loader_generator(loader)

    path = None
    start_epoch, step = 0, 0
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state["settings"] != settings:
                raise InputError(
                    f"{path} holds a fine-tuning run with other settings ({json.dumps(state['settings'])}); "
                    "use another checkpoint_dir or resume=False to start over")
            if _layout(state["model"]) != _layout(student.state_dict()):
                raise InputError(
                    f"{path} holds a fine-tuning run of a different network (other parameter names or shapes); "
                    "use another checkpoint_dir or resume=False to start over")
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if sampler_gen is not None and state["sampler_rng"] is not None:
                sampler_gen.set_state(state["sampler_rng"])
            start_epoch, step = state["epoch"], state["step"]

    student.train()
    bar = tqdm(total=total, initial=step, desc="finetune (distillation)", disable=not progress, leave=False)
    try:
        for epoch in range(start_epoch, epochs):
            if step >= total:
                break
            for batch in loader:
                if step >= total:
                    break
                x, y = _split_batch(batch)
                with torch.no_grad():
                    target = frozen(x)
                loss = distillation_loss(student(x), target, y, temperature=temperature, alpha=alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            if path is not None:
                _save(path, {"settings": settings, "epoch": epoch + 1, "step": step, "model": student.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "rng": torch.get_rng_state(),
                             "sampler_rng": sampler_gen.get_state() if sampler_gen is not None else None})
    finally:
        bar.close()
    return student.eval()
