"""export_onnx: torch.onnx + onnx-simplifier + onnxruntime check; mismatches and failures raise ExportError."""

import os

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers import max_rel_error, randomize_bn

import hant
from hant.graphs.export import export_onnx


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def small_net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), 0)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return {"features": y, "pooled": y.mean(dim=(2, 3))}


def run_ort(path, x):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def test_export_of_an_optimized_module_is_simplified_valid_and_matches(tmp_path):
    model, x = small_net(), torch.randn(2, 3, 16, 16)
    module = hant.optimize(model, x).module
    result = hant.export_onnx(module, x, tmp_path / "net.onnx")
    assert os.fspath(result) == str(tmp_path / "net.onnx") and result.simplified
    assert result.max_error is not None and result.max_error <= 1e-5
    proto = onnx.load(result.path)
    onnx.checker.check_model(proto)
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm",
                                                      "Reshape"}
    (out,) = run_ort(result, x)
    assert max_rel_error(model(x), torch.from_numpy(out)) <= 1e-5


def test_every_output_of_a_dict_output_is_checked(tmp_path):
    model, x = TwoOutputs().eval(), torch.randn(1, 3, 9, 9)
    result = export_onnx(model, x, tmp_path / "two.onnx", simplify=False, opset=13)
    assert result.opset == 13 and not result.simplified
    outs = run_ort(result, x)
    want = model(x)
    assert len(outs) == 2
    assert max_rel_error(want["features"], torch.from_numpy(outs[0])) <= 1e-5
    assert max_rel_error(want["pooled"], torch.from_numpy(outs[1])) <= 1e-5


class NotInOnnx(nn.Module):
    """Differs between eager and export: the TorchScript exporter bakes the Python-side random draw in."""

    def forward(self, x):
        return x + torch.rand(1).item()


def test_mismatch_raises_export_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(hant.ExportError, match="does not reproduce"):
        export_onnx(NotInOnnx(), torch.randn(1, 3), path, simplify=False)
    assert not path.exists()


def test_export_failure_is_an_export_error(tmp_path):
    class Fails(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[0]  # no ONNX symbolic for svd

    with pytest.raises(hant.ExportError, match="Fails"):
        export_onnx(Fails(), torch.randn(3, 3), tmp_path / "svd.onnx")
    assert not (tmp_path / "svd.onnx").exists()


def test_without_check_nothing_is_compared(tmp_path):
    result = export_onnx(NotInOnnx(), torch.randn(1, 3), tmp_path / "unchecked.onnx", simplify=False, check=False)
    assert result.max_error is None and os.path.exists(result.path)
