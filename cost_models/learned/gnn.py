"""A graph network over the FX graph (BRP-NAS / SurgeNAS style), in plain PyTorch.

Each node's feature row is encoded, then ``layers`` rounds of message passing run along the
data edges in both directions (sum over predecessors and sum over successors, separate
weights), with residual updates. Every node then gets a non-negative latency share from a
head, and the graph's latency is the sum of the shares (sum readout) times a scale fixed at
training time. Sums make the prediction independent of the order the nodes are listed in.

An optional device vector (few-shot transfer, :mod:`hant.cost_models.learned.transfer`) is
given to the head beside each node's state, so one trunk serves many devices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GraphNet"]


class GraphNet(nn.Module):
    """Message passing over a batch of disjoint graphs; see the module docstring."""

    def __init__(self, in_dim: int, hidden: int = 32, layers: int = 3, device_dim: int = 0):
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden": hidden, "layers": layers, "device_dim": device_dim}
        self.encode = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.self_w = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.from_inputs = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.from_users = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden + device_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def node_states(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """(n_nodes, hidden) states after message passing. ``edges`` is (2, E): producer, consumer."""
        h = self.encode(x)
        src, dst = edges[0], edges[1]
        for w_self, w_in, w_out, norm in zip(self.self_w, self.from_inputs, self.from_users, self.norms):
            from_inputs = torch.zeros_like(h).index_add_(0, dst, h[src])
            from_users = torch.zeros_like(h).index_add_(0, src, h[dst])
            h = norm(h + F.relu(w_self(h) + w_in(from_inputs) + w_out(from_users)))
        return h

    def node_shares(self, h: torch.Tensor, device: torch.Tensor | None = None) -> torch.Tensor:
        """Non-negative latency share of every node, in units of the training scale.

        ``device``: None, a (device_dim,) vector for all nodes, or (n_devices, device_dim),
        which gives (n_nodes, n_devices) shares.
        """
        if device is None:
            return F.softplus(self.head(h)).squeeze(-1)
        if device.dim() == 1:
            return F.softplus(self.head(torch.cat([h, device.expand(h.shape[0], -1)], dim=1))).squeeze(-1)
        n, d = h.shape[0], device.shape[0]
        pairs = torch.cat([h.unsqueeze(1).expand(n, d, -1), device.unsqueeze(0).expand(n, d, -1)], dim=2)
        return F.softplus(self.head(pairs)).squeeze(-1)

    def forward(self, x: torch.Tensor, edges: torch.Tensor, graph: torch.Tensor, num_graphs: int,
                device: torch.Tensor | None = None) -> torch.Tensor:
        """Per-graph latency (training-scale units): the sum of node shares of each graph."""
        shares = self.node_shares(self.node_states(x, edges), device)
        out = torch.zeros((num_graphs,) + shares.shape[1:], dtype=shares.dtype)
        return out.index_add_(0, graph, shares)
