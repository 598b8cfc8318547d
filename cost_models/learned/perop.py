"""A per-op latency regressor over fused kernels (nn-Meter style), in plain PyTorch.

Runtimes do not run graph nodes one by one: an inference runtime fuses a convolution with
the batch norm and activation after it into one kernel. :func:`group_nodes` groups the
nodes of a graph into the kernels a runtime would launch, by a fusion profile:

* ``"fused"`` (ONNX Runtime, TFLite, TensorRT-like): conv/linear + following batch norm +
  following activation form one kernel, and a lone batch norm takes a following activation;
  a node joins only when it is the sole consumer of the one before and has no other input;
* ``"eager"`` (PyTorch eager): every node is its own kernel.

Each kernel is described by its first node's row, the counts of the op kinds it holds and
its total MACs and bytes; an MLP maps that to a non-negative latency, and the graph's
latency is the sum over kernels plus a learned constant overhead. Grouping follows the
edges, not the row order, so predictions do not depend on how nodes are listed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hant.cost_models.learned.features import FEATURE_NAMES, KINDS, GraphFeatures

__all__ = ["FUSION_PROFILES", "group_nodes", "group_features", "GROUP_FEATURE_DIM", "PerOpNet"]

FUSION_PROFILES = ("fused", "eager")
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
GROUP_FEATURE_DIM = len(FEATURE_NAMES) + len(KINDS) + 3


def group_nodes(graph: GraphFeatures, fusion: str) -> np.ndarray:
    """Kernel id of every row: rows that share an id run as one kernel; the id is its first row."""
    n = graph.num_nodes
    group = np.arange(n)
    if fusion == "eager":
        return group
    kinds = np.argmax(graph.x[:, :len(KINDS)], axis=1)
    src, dst = graph.edges
    single = np.bincount(src, minlength=n)[src] == 1
    only_consumer = np.full(n, -1)
    only_consumer[src[single]] = dst[single]
    producers = np.bincount(dst, minlength=n)
    conv, linear, bn, act = (KINDS.index(k) for k in ("conv", "linear", "batchnorm", "activation"))

    def follow(rows: np.ndarray, kind: int) -> np.ndarray:
        """The sole consumer of each row when it is of ``kind`` and has no other input, else -1."""
        nxt = only_consumer[rows]
        ok = nxt >= 0
        ok[ok] = (kinds[nxt[ok]] == kind) & (producers[nxt[ok]] == 1)
        return np.where(ok, nxt, -1)

    heads = np.flatnonzero((kinds == conv) | (kinds == linear))
    norms = follow(heads, bn)
    group[norms[norms >= 0]] = heads[norms >= 0]
    last = np.where(norms >= 0, norms, heads)
    acts = follow(last, act)
    group[acts[acts >= 0]] = heads[acts >= 0]
    lone = np.flatnonzero((kinds == bn) & (group == np.arange(n)))
    acts = follow(lone, act)
    group[acts[acts >= 0]] = lone[acts >= 0]
    return group


def group_features(graph: GraphFeatures, fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """(kernel rows (n_kernels, GROUP_FEATURE_DIM), first row of each kernel)."""
    group = group_nodes(graph, fusion)
    anchors, inverse = np.unique(group, return_inverse=True)
    counts = np.zeros((len(anchors), len(KINDS)), dtype=np.float32)
    np.add.at(counts, inverse, graph.x[:, :len(KINDS)])
    macs = np.zeros(len(anchors))
    nbytes = np.zeros(len(anchors))
    np.add.at(macs, inverse, np.expm1(graph.x[:, _COL["log_macs"]].astype(np.float64)))
    np.add.at(nbytes, inverse, np.expm1(graph.x[:, _COL["log_bytes"]].astype(np.float64)))
    size = np.bincount(inverse).astype(np.float32)
    rows = np.concatenate([graph.x[anchors], counts, np.log1p(macs)[:, None].astype(np.float32),
                           np.log1p(nbytes)[:, None].astype(np.float32), size[:, None]], axis=1)
    return rows, anchors


class PerOpNet(nn.Module):
    """Kernel-wise MLP: latency = sum of softplus(MLP(kernel row)) + softplus(overhead)."""

    def __init__(self, in_dim: int = GROUP_FEATURE_DIM, hidden: int = 64):
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden": hidden}
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.overhead = nn.Parameter(torch.tensor(-3.0))

    def kernel_shares(self, rows: torch.Tensor) -> torch.Tensor:
        """Non-negative latency of each kernel, in units of the training scale."""
        return F.softplus(self.mlp(rows)).squeeze(-1)

    def constant(self) -> torch.Tensor:
        """The per-graph overhead, in units of the training scale."""
        return F.softplus(self.overhead)

    def forward(self, rows: torch.Tensor, kernel: torch.Tensor, graph: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """Per-graph latency: kernel k of the batch has row ``rows[kernel[k]]`` and belongs to ``graph[k]``
        (distinct rows are priced once)."""
        shares = self.kernel_shares(rows)[kernel]
        out = torch.zeros(num_graphs, dtype=rows.dtype).index_add_(0, graph, shares)
        return out + self.constant()
