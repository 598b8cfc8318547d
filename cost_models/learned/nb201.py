"""NAS-Bench-201 networks as PyTorch modules, built from their cell strings.

Written from the description in Dong & Yang, "NAS-Bench-201" (ICLR 2020), for CIFAR-sized
32x32 inputs (see ``data/README.md``):

* stem: 3x3 conv (3 -> C, no bias) + BatchNorm;
* three stages of ``N`` cells with C, 2C and 4C channels;
* between stages a residual reduction block: ReLU-conv3x3(stride 2)-BN, ReLU-conv3x3-BN,
  plus a shortcut avgpool 2x2 (stride 2) + 1x1 conv; the two branches are added;
* BN-ReLU, global average pooling, linear classifier.

A cell is a DAG on 4 nodes; each of its 6 edges ``op~i -> j`` (i < j) carries one of
:data:`OPS`, and node j is the sum of its incoming edges. ``none`` is the zero op
(``x.mul(0.0)``, as in the benchmark's own code), ``skip_connect`` an ``nn.Identity``,
``nor_conv_KxK`` ReLU-conv-BN and ``avg_pool_3x3`` a 3x3 average pool (stride 1, padding 1,
padding not counted).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch
import torch.nn as nn

from hant.errors import CostModelError

__all__ = ["OPS", "EDGES", "nb201", "parse_arch", "arch_string", "all_arch_strings", "input_shape", "Cell",
           "NB201Family", "family"]

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# (target node j, source node i) of the six edges, in the order of the cell string.
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))

_ARCH = re.compile(r"^\|(\w+)~0\|\+\|(\w+)~0\|(\w+)~1\|\+\|(\w+)~0\|(\w+)~1\|(\w+)~2\|$")


def parse_arch(arch_str: str) -> tuple[str, ...]:
    """The six edge ops of a cell string, in :data:`EDGES` order.

    Raises :class:`CostModelError` for a string that is not a NAS-Bench-201 cell.
    """
    match = _ARCH.match(arch_str.strip()) if isinstance(arch_str, str) else None
    if match is None or any(op not in OPS for op in match.groups()):
        raise CostModelError(
            f"{arch_str!r} is not a NAS-Bench-201 cell string; expected e.g. "
            "'|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|' "
            f"with ops from {', '.join(OPS)}"
        )
    return match.groups()


def arch_string(ops: tuple[str, ...] | list[str]) -> str:
    """The cell string of six edge ops given in :data:`EDGES` order."""
    o = list(ops)
    return f"|{o[0]}~0|+|{o[1]}~0|{o[2]}~1|+|{o[3]}~0|{o[4]}~1|{o[5]}~2|"


def all_arch_strings() -> list[str]:
    """All 5**6 = 15,625 cell strings."""
    return [arch_string(ops) for ops in itertools.product(OPS, repeat=6)]


def input_shape(batch: int = 1) -> tuple[int, int, int, int]:
    """The input shape the networks are defined for (CIFAR-sized)."""
    return (batch, 3, 32, 32)


class _Zero(nn.Module):
    """The ``none`` edge: a zero tensor of the input's shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def _relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


def _edge_op(op: str, channels: int) -> nn.Module:
    if op == "none":
        return _Zero()
    if op == "skip_connect":
        return nn.Identity()
    if op == "nor_conv_1x1":
        return _relu_conv_bn(channels, channels, 1, 1)
    if op == "nor_conv_3x3":
        return _relu_conv_bn(channels, channels, 3, 1)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise CostModelError(f"unknown NAS-Bench-201 op {op!r}; use one of {', '.join(OPS)}")


class Cell(nn.Module):
    """One NAS-Bench-201 cell: node j = sum over i < j of edge_{j<-i}(node i); returns node 3."""

    def __init__(self, ops: tuple[str, ...], channels: int):
        super().__init__()
        self.edges = nn.ModuleList(_edge_op(op, channels) for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in range(1, 4):
            total = None
            for k, (j, i) in enumerate(EDGES):
                if j == target:
                    y = self.edges[k](nodes[i])
                    total = y if total is None else total + y
            nodes.append(total)
        return nodes[3]


class ReductionBlock(nn.Module):
    """Residual stride-2 block between stages: conv branch plus avgpool + 1x1 conv shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = _relu_conv_bn(c_in, c_out, 3, 2)
        self.conv_b = _relu_conv_bn(c_out, c_out, 3, 1)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """The NAS-Bench-201 macro skeleton around one cell type (see the module docstring)."""

    def __init__(self, ops: tuple[str, ...], C: int = 16, N: int = 5, num_classes: int = 10):
        super().__init__()
        self.arch = arch_string(ops)
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        layers: list[nn.Module] = []
        for stage, channels in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                layers.append(ReductionBlock(channels // 2, channels))
            layers.extend(Cell(ops, channels) for _ in range(N))
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * C), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * C, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lastact(self.cells(self.stem(x)))
        return self.classifier(torch.flatten(self.global_pooling(out), 1))


def nb201(arch_str: str, C: int = 16, N: int = 5, num_classes: int = 10) -> nn.Module:
    """Build the NAS-Bench-201 network of a cell string (eval mode, random weights).

    ``C`` is the first stage's width, ``N`` the cells per stage. Input: (B, 3, 32, 32).
    Raises :class:`CostModelError` for a malformed cell string or bad sizes.
    """
    if C < 1 or N < 1 or num_classes < 1:
        raise CostModelError(f"nb201 needs C, N and num_classes >= 1, got C={C}, N={N}, num_classes={num_classes}")
    return NB201Network(parse_arch(arch_str), C, N, num_classes).eval()


# ------------------------------------------------------------------ fast featurisation of the family

class NB201Family:
    """Featurises NB201 networks by assembling pre-featurised pieces.

    ``featurize(arch)`` equals ``featurize(hant.trace(nb201(arch, C, N, num_classes), x))`` up
    to the order of rows (which the models ignore): the skeleton (stem, reduction blocks,
    head) is traced once with the cells as leaves, and each stage's edge chains and sum node
    once from one-op cells. Assembling a network then follows :meth:`Cell.forward` and takes
    about a millisecond instead of a trace. Results are cached per architecture string.
    """

    arch_column = "arch_str"

    def __init__(self, C: int = 16, N: int = 5, num_classes: int = 10, batch: int = 1):
        from hant.cost_models.learned.features import local_features
        from hant.graphs import trace
        from hant.graphs.ops import add_of

        self.config = {"C": C, "N": N, "num_classes": num_classes, "batch": batch}
        widths = (C, 2 * C, 4 * C)
        skeleton = NB201Network(("none",) * 6, C, N, num_classes).eval()
        gm = trace(skeleton, torch.zeros(input_shape(batch)), leaf_modules=[Cell])
        rows, producers, nodes = local_features(gm)
        parts = [rows]
        self._nodes = list(nodes)    # the traced node behind every library row (traces kept alive)
        self._graphs = [gm]
        # Skeleton entries: (library row, producers), or (-1 - stage, producers) for a cell slot.
        self._skeleton: list[tuple[int, list[int]]] = []
        for i, node in enumerate(nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Cell):
                stage = widths.index(int(node.meta["tensor_meta"].shape[1]))
                self._skeleton.append((-1 - stage, producers[i]))
            else:
                self._skeleton.append((i, producers[i]))
        self._outputs = [nodes.index(a) for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes]
        self._chains: list[dict[str, list[int]]] = []   # per stage: op -> library rows of its chain
        self._adds: list[int] = []                        # per stage: library row of a sum node
        offset = len(rows)
        for stage, width in enumerate(widths):
            side = 32 >> stage
            chains = {}
            for op in OPS:
                cell_gm = trace(Cell((op,) * 6, width), torch.zeros(batch, width, side, side))
                cell_rows, _, cell_nodes = local_features(cell_gm)
                length = 3 if op.startswith("nor_conv") else 1    # ReLU-conv-BN, or one node
                chains[op] = list(range(offset + 1, offset + 1 + length))  # row 0 is the cell input
                if op == "skip_connect":
                    self._adds.append(offset + next(k for k, n in enumerate(cell_nodes) if add_of(n) is not None))
                parts.append(cell_rows)
                self._nodes.extend(cell_nodes)
                self._graphs.append(cell_gm)
                offset += len(cell_rows)
            self._chains.append(chains)
        self._library = np.concatenate(parts)
        self._cache: dict[str, object] = {}
        self._library_rows: dict[str, np.ndarray] = {}
        self._row_costs: dict[str, np.ndarray] = {}

    def featurize(self, arch_str: str):
        """The :class:`~hant.cost_models.learned.features.GraphFeatures` of one network (cached)."""
        from hant.cost_models.learned.features import GraphFeatures, finish

        graph = self._cache.get(arch_str)
        if graph is not None:
            return graph
        ops = parse_arch(arch_str)
        library_rows: list[int] = []
        producers: list[list[int]] = []

        def emit(row: int, inputs: list[int]) -> int:
            library_rows.append(row)
            producers.append(inputs)
            return len(library_rows) - 1

        placed: list[int] = []       # skeleton index -> row in the assembled graph
        for row, inputs in self._skeleton:
            inputs = [placed[j] for j in inputs]
            if row >= 0:
                placed.append(emit(row, inputs))
                continue
            stage = -1 - row
            cell = [inputs[0]]
            for target in range(1, 4):
                total = None
                for k, (j, i) in enumerate(EDGES):
                    if j != target:
                        continue
                    y = cell[i]
                    for chain_row in self._chains[stage][ops[k]]:
                        y = emit(chain_row, [y])
                    total = y if total is None else emit(self._adds[stage], [total, y])
                cell.append(total)
            placed.append(cell[3])
        x = self._library[library_rows]
        edges = finish(x, producers, [placed[i] for i in self._outputs])
        graph = GraphFeatures(x, edges)
        self._cache[arch_str] = graph
        self._library_rows[arch_str] = np.asarray(library_rows, dtype=np.int32)
        return graph

    def node_sum(self, cost_model, arch_str: str) -> np.ndarray:
        """(latency_s, MACs, params, bytes) of a node-sum cost model (``flops``, ``roofline:...``) on a network.

        Equals the model's ``graph_cost`` of the traced network: every assembled row is a traced
        node, priced once per library row.
        """
        key = getattr(cost_model, "name", str(id(cost_model)))
        costs = self._row_costs.setdefault(key, np.full((len(self._nodes), 4), np.nan))
        self.featurize(arch_str)
        rows = self._library_rows[arch_str]
        for row in np.unique(rows[np.isnan(costs[rows, 0])]):
            node = self._nodes[row]
            if node.op == "placeholder":
                costs[row] = 0.0
                continue
            c = cost_model.node_cost(node)
            costs[row] = (c.latency_s, c.macs, c.params, c.bytes)
        return costs[rows].sum(axis=0)

    def clear_cache(self) -> None:
        """Forget the featurised networks (they take about 40 kB each)."""
        self._cache.clear()
        self._library_rows.clear()


_FAMILIES: dict[tuple, NB201Family] = {}


def family(C: int = 16, N: int = 5, num_classes: int = 10, batch: int = 1) -> NB201Family:
    """The shared :class:`NB201Family` for these sizes (built on first use)."""
    key = (C, N, num_classes, batch)
    if key not in _FAMILIES:
        _FAMILIES[key] = NB201Family(C, N, num_classes, batch)
    return _FAMILIES[key]
