"""Few-shot transfer to a device never trained on (HELP-like, our own design).

A device is described by what it does to a few fixed **reference networks**: the device
vector is its log latencies on them, centred and scaled (the shape of its cost profile),
plus their spread; their geometric mean fixes the device's latency scale. One
:class:`~hant.cost_models.learned.gnn.GraphNet` is pre-trained on many devices at once: the
message-passing trunk is shared, the head sees each node's state beside the device vector.

To serve a new device, measure the reference networks there (10 by default) and call
:func:`adapt`: it builds the device vector from them, then briefly fine-tunes that vector
(and nothing else) on every row given, the references and any extra ones. The result is an
ordinary :class:`~hant.cost_models.learned.predictor.Predictor` (``learned:PATH`` once saved).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from hant.cost_models.learned.features import GraphFeatures
from hant.cost_models.learned.fit import _normalisation
from hant.cost_models.learned.gnn import GraphNet
from hant.cost_models.learned.predictor import Predictor
from hant.errors import CostModelError

__all__ = ["Pretrained", "pick_references", "device_vector", "pretrain", "adapt"]


@dataclass
class Pretrained:
    """A multi-device GraphNet and the reference networks its device vectors are made from."""
    net: GraphNet
    config: dict
    x_mean: torch.Tensor
    x_std: torch.Tensor
    units: float                 # mean number of rows per training graph
    references: list[str]        # reference architectures, in device-vector order
    devices: list[str]           # the columns it was pre-trained on


def pick_references(archs: list[str], graphs: list[GraphFeatures], k: int = 10) -> list[str]:
    """``k`` architectures spread evenly over total MACs (live nodes only), from the given ones."""
    from hant.cost_models.learned.features import FEATURE_NAMES
    macs_col, dead_col = FEATURE_NAMES.index("log_macs"), FEATURE_NAMES.index("dead")
    work = np.array([float(np.sum(np.expm1(g.x[:, macs_col].astype(np.float64)) * (1 - g.x[:, dead_col])))
                     for g in graphs])
    order = np.argsort(work, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, k).round().astype(int)]
    return [archs[i] for i in picks]


def device_vector(reference_latency_s) -> tuple[torch.Tensor, float]:
    """(device vector, log geometric-mean latency) from latencies on the reference networks."""
    logs = np.log(np.asarray(reference_latency_s, dtype=np.float64))
    centre, spread = float(logs.mean()), float(logs.std()) + 1e-6
    vec = np.concatenate([(logs - centre) / spread, [spread]]).astype(np.float32)
    return torch.from_numpy(vec), centre


def pretrain(archs: list[str], latency_s: np.ndarray, devices: list[str], family, references: list[str],
             reference_latency_s: np.ndarray, *, hidden: int = 32, layers: int = 3, steps: int = 300,
             lr: float = 1e-2, seed: int = 0) -> Pretrained:
    """Pre-train one GraphNet on several devices.

    ``latency_s``: (len(archs), len(devices)) seconds; ``reference_latency_s``:
    (len(references), len(devices)), each device's latencies on the reference networks.
    ``family`` featurises architecture strings (e.g. :func:`hant.cost_models.learned.nb201.family`).
    """
    y = np.asarray(latency_s, dtype=np.float64)
    if y.shape != (len(archs), len(devices)) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise CostModelError("latency_s must be a positive (archs x devices) array")
    torch.manual_seed(seed)
    graphs = [family.featurize(a) for a in archs]
    vectors, centres = zip(*(device_vector(reference_latency_s[:, d]) for d in range(len(devices))))
    dev = torch.stack(vectors)
    units = float(np.mean([g.num_nodes for g in graphs]))
    log_scale = torch.tensor(centres, dtype=torch.float32) - math.log(units)
    mean, std = _normalisation(np.concatenate([g.x for g in graphs]))
    net = GraphNet(mean.numel(), hidden, layers, dev.shape[1])
    template = Predictor("gnn", {"hidden": hidden, "layers": layers, "device_dim": dev.shape[1]}, net, mean, std, 1.0)
    target = torch.from_numpy(np.log(y)).float() - log_scale
    batch = template.inputs(graphs)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    for _ in range(steps):
        out = template.forward(batch, dev)
        loss = torch.mean((torch.log(out.clamp_min(1e-9)) - target) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return Pretrained(net, template.config, mean, std, units, list(references), list(devices))


def adapt(pretrained: Pretrained, family, reference_latency_s, extra_archs: list[str] = (),
          extra_latency_s=(), *, steps: int = 100, lr: float = 2e-2, metadata: dict | None = None) -> Predictor:
    """A predictor for a new device from its latencies on the reference networks (plus extra rows).

    The network's weights stay as pre-trained; only the device vector is tuned, on the rows
    given here, so it never sees rows it will be scored on.
    """
    ref = np.asarray(reference_latency_s, dtype=np.float64)
    if ref.shape != (len(pretrained.references),) or np.any(~np.isfinite(ref)) or np.any(ref <= 0):
        raise CostModelError(f"give positive latencies of the {len(pretrained.references)} reference networks, "
                             f"in the order of Pretrained.references")
    vec, centre = device_vector(ref)
    scale = math.exp(centre) / pretrained.units
    net = copy.deepcopy(pretrained.net)
    archs = list(pretrained.references) + list(extra_archs)
    y = np.concatenate([ref, np.asarray(extra_latency_s, dtype=np.float64)])
    predictor = Predictor("gnn", pretrained.config, net, pretrained.x_mean, pretrained.x_std, scale,
                          dict(metadata or {}, adapted_rows=len(archs), pretrained_on=pretrained.devices,
                               references=pretrained.references), vec.clone())
    if steps > 0:
        batch = predictor.inputs([family.featurize(a) for a in archs])
        target = torch.from_numpy(np.log(y / scale)).float()
        param = torch.nn.Parameter(vec.clone())
        opt = torch.optim.Adam([param], lr=lr)
        for p in net.parameters():
            p.requires_grad_(False)
        for _ in range(steps):
            loss = torch.mean((torch.log(predictor.forward(batch, param).clamp_min(1e-9)) - target) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        predictor.device = param.detach().clone()
    return predictor
