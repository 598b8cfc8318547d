"""Every torchvision classifier traces with hant.trace and the traced module computes what the model does.

Random weights with randomised BatchNorm statistics, eval mode, batch 1, the smallest input
each family takes. ViTs are built for an image of two by two patches (``image_size`` is a
constructor argument: the same layers, a five-token sequence) so that vit_h_14 costs seconds,
not minutes; one ViT is also checked at its default 224. MaxViT needs 224 (its partitions are 7x7).
One test per model, so a failure names the model; each frees its model before the next.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision

import hant
from helpers import max_rel_error, randomize_bn

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
_MIN_SIZE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224}  # the smallest input these accept
_DEFAULT_SIZE = 32  # every other CNN (and Swin, which pads its windows) runs at 32x32
# Models that symbolic tracing cannot take and that therefore come back in the export form: none today.
# A model appearing here is a regression of the canonical form, so the test asserts the method used.
EXPORT_FORM: frozenset[str] = frozenset()
TOLERANCE = 1e-5  # max error relative to the largest output, float32; symbolic tracing reruns the same kernels


def _build(name: str, image_size: int | None) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        size = image_size or 2 * patch
        model = torchvision.models.get_model(name, image_size=size)
    else:
        size = _MIN_SIZE.get(name, _DEFAULT_SIZE)
        model = torchvision.models.get_model(name)
    randomize_bn(model, seed=1)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))


def _check(name: str, image_size: int | None, record_property) -> None:
    model, x = _build(name, image_size)
    try:
        with torch.no_grad():
            expected = model(x)
        gm = hant.trace(model, x)
        method = gm.meta["hant_trace_method"]
        record_property("trace_method", method)
        with torch.no_grad():
            actual = gm(x)
        assert method == ("export" if name in EXPORT_FORM else "symbolic"), f"{name} was captured by {method}"
        assert actual.shape == expected.shape
        assert max_rel_error(expected, actual) <= TOLERANCE
        result = gm.graph.output_node().args[0]
        assert tuple(result.meta["tensor_meta"].shape) == tuple(expected.shape)
    finally:
        del model
        gc.collect()


def test_every_classifier_is_listed():
    assert len(CLASSIFIERS) >= 80 and "resnet18" in CLASSIFIERS and "vit_h_14" in CLASSIFIERS


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_traces_and_matches_eager(name, record_property):
    _check(name, None, record_property)


@pytest.mark.slow
def test_vit_at_its_default_size(record_property):
    _check("vit_b_16", 224, record_property)
