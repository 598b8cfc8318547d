"""Phase 1 of operator substitution: layer-wise feature-map distillation of candidates.

Given sites (a name, the teacher's module for the region, and the region's input and
output captured on calibration batches) and a candidate library, every
(site, candidate) *job* trains the candidate to reproduce the teacher's output from the
teacher's input, with a normalised MSE, for a fixed number of steps. All jobs of one
site train together on the same batches.

Persistence: a run directory holds one file per finished job (weights + score), written
atomically, so a killed run resumes and redoes nothing finished. Sharding: jobs are
ordered deterministically and rank ``r`` of ``world`` takes every ``world``-th one; each
job's initialisation and data order depend only on the job, so any sharding gives the
same scores. Under ``torchrun`` the ranks meet at a gloo barrier and rank 0 gathers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from hant.errors import PassError

__all__ = ["SiteCapture", "DistillConfig", "JobResult", "capture_sites", "distill_jobs", "collect_results",
           "normalized_mse", "job_seed", "distributed_context", "DistributedContext", "write_manifest"]


@dataclass
class SiteCapture:
    """A site's teacher input/output pairs, one tensor pair per calibration batch."""
    name: str
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.inputs, self.outputs)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class JobResult:
    site: str
    candidate: str
    loss: float            # final normalised MSE on the captured batches (eval mode)
    steps: int
    path: str              # file holding the trained weights


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean square: 0 is perfect, 1 is as bad as predicting zero."""
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def job_seed(site: str, candidate: str) -> int:
    """A seed that depends on the job alone, so results do not depend on sharding."""
    return int.from_bytes(hashlib.sha256(f"{site}/{candidate}".encode()).digest()[:4], "little")


def _job_path(run_dir: Path, site: str, candidate: str) -> Path:
    return run_dir / "jobs" / site / f"{candidate}.pt"


def capture_sites(observer: nn.Module, batches: Iterable, site_names: list[str]) -> dict[str, SiteCapture]:
    """Run ``observer`` (a module returning ``{site: (input, output)}``) on every batch.

    ``batches`` yields input tensors or ``(input, label)`` pairs. Captures are detached
    and kept on the CPU.
    """
    captures = {name: SiteCapture(name, [], []) for name in site_names}
    with torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            seen = observer(x)
            for name in site_names:
                inp, out = seen[name]
                captures[name].inputs.append(inp.detach().cpu())
                captures[name].outputs.append(out.detach().cpu())
    return captures


def _train_site(site: SiteCapture, jobs: dict[str, Callable[[], nn.Module]], config: DistillConfig,
                run_dir: Path, progress: tqdm) -> None:
    """Train the given candidates of one site together, writing each as it finishes.

    ``progress`` counts job-steps, so its estimate of the time left is live within a site.
    """
    models, optimizers = {}, {}
    for candidate, factory in jobs.items():
        torch.manual_seed(job_seed(site.name, candidate))
        model = factory()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[candidate] = model
        optimizers[candidate] = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay) \
            if params else None
    n_batches = len(site.inputs)
    if n_batches == 0:
        raise PassError(f"site {site.name!r} has no captured batches; give the loader at least one batch")
    for step in range(config.steps):
        x, y = site.inputs[step % n_batches], site.outputs[step % n_batches]
        lr = config.lr * 0.5 * (1 + torch.cos(torch.tensor(step / max(config.steps, 1) * torch.pi))).item()
        for candidate, model in models.items():
            opt = optimizers[candidate]
            if opt is None:
                continue
            for group in opt.param_groups:
                group["lr"] = lr
            loss = normalized_mse(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress.update(len(models))
    for candidate, model in models.items():
        model.eval()
        with torch.no_grad():
            losses = [normalized_mse(model(x), y).item() for x, y in site.batches()]
        path = _job_path(run_dir, site.name, candidate)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "loss": float(sum(losses) / len(losses)),
                    "steps": config.steps, "config": config.as_dict()}, tmp)
        os.replace(tmp, path)   # atomic: a killed run never leaves half a job


def distill_jobs(captures: dict[str, SiteCapture], candidates: dict[str, dict[str, Callable[[], nn.Module]]],
                 config: DistillConfig, run_dir: str | os.PathLike, *, rank: int = 0, world: int = 1,
                 show_progress: bool = True) -> int:
    """Train this rank's share of the unfinished (site, candidate) jobs; return how many it trained.

    ``candidates[site]`` maps candidate names to factories. Finished jobs (a file in
    ``run_dir/jobs``) are skipped, so calling again after a kill resumes.
    """
    run_dir = Path(run_dir)
    all_jobs = sorted((site, cand) for site in candidates for cand in candidates[site])
    mine = [job for i, job in enumerate(all_jobs) if i % world == rank]
    todo = [job for job in mine if not _job_path(run_dir, *job).exists()]
    by_site: dict[str, dict[str, Callable[[], nn.Module]]] = {}
    for site, cand in todo:
        by_site.setdefault(site, {})[cand] = candidates[site][cand]
    with tqdm(total=len(mine) * config.steps, initial=(len(mine) - len(todo)) * config.steps,
              desc=f"distil {len(todo)} of {len(mine)} jobs (rank {rank})", disable=not show_progress,
              unit="job-step") as progress:
        for site, jobs in by_site.items():
            _train_site(captures[site], jobs, config, run_dir, progress)
    return len(todo)


def collect_results(run_dir: str | os.PathLike, candidates: dict[str, Iterable[str]]) -> dict[str, dict[str, JobResult]]:
    """Read every finished job's score; raise :class:`PassError` naming any job still missing."""
    run_dir = Path(run_dir)
    results: dict[str, dict[str, JobResult]] = {}
    missing = []
    for site, names in candidates.items():
        for cand in names:
            path = _job_path(run_dir, site, cand)
            if not path.exists():
                missing.append(f"{site}/{cand}")
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            results.setdefault(site, {})[cand] = JobResult(site, cand, saved["loss"], saved["steps"], str(path))
    if missing:
        raise PassError(f"{len(missing)} distillation jobs are unfinished (e.g. {missing[:3]}); "
                        "run the distillation again with the same run directory to finish them")
    return results


def write_manifest(run_dir: str | os.PathLike, manifest: dict) -> None:
    """Record what a run directory was made for; refuse to mix runs of different setups."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise PassError(f"run directory {run_dir} was made with different settings ({', '.join(changed)}); "
                            "use a new --run-dir or delete the old one")
        return
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world: int
    initialized_here: bool


def distributed_context() -> DistributedContext:
    """Rank and world size under torchrun (gloo on CPU), or (0, 1) in a plain process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistributedContext(0, 1, False)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        initialized_here = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), initialized_here)
