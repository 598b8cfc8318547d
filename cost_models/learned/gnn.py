"""A graph network over the FX graph (BRP-NAS / SurgeNAS style), in plain PyTorch.

Each node's feature row is encoded, then ``layers`` rounds of message passing run along the
data edges in both directions (sum over predecessors and sum over successors, separate
weights), with residual updates. Every node then gets a non-negative latency share from a
head, and the graph's latency is the sum of the shares (sum readout) times a scale fixed at
training time. Sums make the prediction independent of the order the nodes are listed in.

One trunk can serve many devices in two ways: an optional device vector given to the head
beside each node's state (``device_dim``), or one latency head per device (``outputs``), which
few-shot transfer (:mod:`hant.cost_models.learned.transfer`) mixes for a new device with
non-negative weights. Either way the latency stays a sum of per-node shares.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GraphNet", "compress"]


def compress(x: torch.Tensor, edges: torch.Tensor, layers: int, seed: int = 0) -> dict:
    """A plan that computes the same node states once per distinct neighbourhood.

    Two nodes whose rows are equal and whose neighbours (both directions) were equal in the
    previous round have equal states after every round of sum message passing
    (Weisfeiler-Lehman refinement). Batches of graphs from one family repeat most
    neighbourhoods, so the network runs on far fewer rows. Rows and neighbour multisets are
    hashed as wrapping sums of random 64-bit codes (a collision has probability about 2**-64
    per pair of distinct neighbourhoods).
    """
    rng = np.random.default_rng(seed)
    src, dst = edges[0].numpy(), edges[1].numpy()
    bits = np.ascontiguousarray(x.numpy(), dtype=np.float32).view(np.uint32).astype(np.uint64)
    row_code = (bits * rng.integers(1, 2**63, size=bits.shape[1], dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    _, first, color = np.unique(row_code, return_index=True, return_inverse=True)
    color = color.reshape(-1)
    plan = {"rows": x[torch.from_numpy(first)], "rounds": []}
    for _ in range(layers):
        code = rng.integers(0, 2**63, size=(3, color.max() + 1), dtype=np.uint64)
        key = code[0][color]
        np.add.at(key, dst, code[1][color[src]])
        np.add.at(key, src, code[2][color[dst]])
        _, first, new = np.unique(key, return_index=True, return_inverse=True)
        new = new.reshape(-1)
        is_rep = np.zeros(len(color), dtype=bool)
        is_rep[first] = True
        into, out_of = is_rep[dst], is_rep[src]
        plan["rounds"].append({
            "self": torch.from_numpy(color[first]), "n": len(first),
            "in_dst": torch.from_numpy(new[dst[into]]), "in_src": torch.from_numpy(color[src[into]]),
            "out_src": torch.from_numpy(new[src[out_of]]), "out_dst": torch.from_numpy(color[dst[out_of]]),
        })
        color = new
    plan["color"] = torch.from_numpy(color)
    return plan


class GraphNet(nn.Module):
    """Message passing over a batch of disjoint graphs; see the module docstring."""

    def __init__(self, in_dim: int, hidden: int = 32, layers: int = 3, device_dim: int = 0, outputs: int = 1):
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden": hidden, "layers": layers, "device_dim": device_dim,
                       "outputs": outputs}
        self.encode = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.self_w = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.from_inputs = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.from_users = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden + device_dim, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights; a net built with one output takes the head count of a saved multi-head net.

        Predictor files rebuild the net from its sizes before loading; the number of heads is
        read from the weights themselves.
        """
        outputs = state_dict["head.2.weight"].shape[0] if "head.2.weight" in state_dict else self.config["outputs"]
        if outputs != self.config["outputs"]:
            self.head[2] = nn.Linear(self.head[2].in_features, outputs)
            self.config["outputs"] = outputs
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def node_states(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """(n_nodes, hidden) states after message passing. ``edges`` is (2, E): producer, consumer."""
        h = self.encode(x)
        src, dst = edges[0], edges[1]
        for w_self, w_in, w_out, norm in zip(self.self_w, self.from_inputs, self.from_users, self.norms):
            from_inputs = torch.zeros_like(h).index_add_(0, dst, h[src])
            from_users = torch.zeros_like(h).index_add_(0, src, h[dst])
            h = norm(h + F.relu(w_self(h) + w_in(from_inputs) + w_out(from_users)))
        return h

    def compressed_states(self, plan: dict) -> torch.Tensor:
        """States of the distinct neighbourhoods of a :func:`compress` plan (index with ``plan["color"]``)."""
        h = self.encode(plan["rows"])
        for r, w_self, w_in, w_out, norm in zip(plan["rounds"], self.self_w, self.from_inputs, self.from_users,
                                                self.norms):
            mine = h[r["self"]]
            from_inputs = torch.zeros_like(mine).index_add_(0, r["in_dst"], h[r["in_src"]])
            from_users = torch.zeros_like(mine).index_add_(0, r["out_src"], h[r["out_dst"]])
            h = norm(mine + F.relu(w_self(mine) + w_in(from_inputs) + w_out(from_users)))
        return h

    def node_shares(self, h: torch.Tensor, device: torch.Tensor | None = None) -> torch.Tensor:
        """Non-negative latency share of every node, in units of the training scale.

        With ``device_dim``: ``device`` is a (device_dim,) vector for all nodes, or
        (n_devices, device_dim), which gives (n_nodes, n_devices) shares. With several
        ``outputs``: None gives (n_nodes, outputs) shares, one column per head, and a
        non-negative (outputs,) ``device`` gives their weighted sum, (n_nodes,).
        """
        if self.config["outputs"] > 1:
            shares = F.softplus(self.head(h))
            return shares if device is None else shares @ device
        if device is None:
            return F.softplus(self.head(h)).squeeze(-1)
        if device.dim() == 1:
            return F.softplus(self.head(torch.cat([h, device.expand(h.shape[0], -1)], dim=1))).squeeze(-1)
        n, d = h.shape[0], device.shape[0]
        pairs = torch.cat([h.unsqueeze(1).expand(n, d, -1), device.unsqueeze(0).expand(n, d, -1)], dim=2)
        return F.softplus(self.head(pairs)).squeeze(-1)

    def forward(self, x: torch.Tensor | None, edges: torch.Tensor | None, graph: torch.Tensor, num_graphs: int,
                device: torch.Tensor | None = None, plan: dict | None = None) -> torch.Tensor:
        """Per-graph latency (training-scale units): the sum of node shares of each graph.

        With a :func:`compress` plan of (x, edges), the same numbers are computed once per
        distinct neighbourhood (``x`` and ``edges`` are then not read).
        """
        if plan is not None:
            shares = self.node_shares(self.compressed_states(plan), device)[plan["color"]]
        else:
            shares = self.node_shares(self.node_states(x, edges), device)
        out = torch.zeros((num_graphs,) + shares.shape[1:], dtype=shares.dtype)
        return out.index_add_(0, graph, shares)
