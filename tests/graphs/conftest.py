"""Captures shared by the graph tests: each (model, form) is traced once per session.

Tests must not mutate the GraphModules they get here (extracting a region is fine).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from hant.graphs import propagate_shapes, trace
from helpers import randomize_bn


@pytest.fixture(scope="session")
def capture():
    """``capture(name, form)`` -> (model, x, gm); form is "symbolic", "export" or "core_aten"."""
    models: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    graphs: dict[tuple[str, str], torch.fx.GraphModule] = {}

    def get(name: str, form: str):
        if name not in models:
            model = randomize_bn(torchvision.models.get_model(name), seed=3)
            models[name] = (model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
        model, x = models[name]
        if (name, form) not in graphs:
            if form == "core_aten":
                program = torch.export.export(model, (x,), strict=False).run_decompositions()
                graphs[name, form] = propagate_shapes(program.module(), x)
            else:
                graphs[name, form] = trace(model, x, method=form)
        return model, x, graphs[name, form]

    return get
