"""ONNX export with proof: torch.onnx.export, onnx-simplifier, then onnxruntime against the module.

The TorchScript exporter (``dynamo=False``) is used: it runs offline and is deterministic
on the plain conv/linear graphs hant produces. The export is checked with
``onnx.checker`` and then run in onnxruntime (CPU) on the example inputs; every output
must match the module's within ``max|ort - torch| <= atol + rtol * max|torch|``, or
:class:`hant.errors.ExportError` is raised and the file is removed (nothing half-done).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from hant.errors import ExportError
from hant.graphs.trace import as_input_tuple

__all__ = ["export_onnx", "OnnxExport", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    """Where the model went and how well onnxruntime reproduced it. Usable as a path (``os.fspath``)."""
    path: str
    simplified: bool
    max_error: float | None          # max over outputs of max|ort - torch| / max|torch|; None without check
    opset: int

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in _flatten(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    return []


def _compare(expected: list[torch.Tensor], actual: list, rtol: float, atol: float) -> tuple[float, str]:
    if len(expected) != len(actual):
        return float("inf"), f"onnxruntime gave {len(actual)} outputs, the module {len(expected)}"
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        e64 = e.detach().double()
        a64 = torch.from_numpy(a).double()
        if e64.shape != a64.shape:
            return float("inf"), f"output {i}: shape {tuple(a64.shape)} from onnxruntime, {tuple(e64.shape)} expected"
        diff = float((e64 - a64).abs().max()) if e64.numel() else 0.0
        scale = float(e64.abs().max()) if e64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf"), f"output {i}: NaN from onnxruntime"
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else float("inf")))
        if diff > atol + rtol * scale:
            return worst, f"output {i}: max abs error {diff:.3g} > atol {atol:g} + rtol {rtol:g} * {scale:.3g}"
    return worst, ""


def export_onnx(module: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *, simplify: bool = True,
                check: bool = True, opset: int | None = None, rtol: float = 1e-4, atol: float = 1e-5) -> OnnxExport:
    """Export ``module`` to ONNX at ``path``; simplify it with onnxsim; check it with onnxruntime.

    ``example_inputs``: a tensor or tuple of tensors (the graph is exported for their
    shapes). ``opset`` defaults to :data:`DEFAULT_OPSET`. With ``check`` the ONNX model
    must pass ``onnx.checker`` and reproduce the module's outputs in onnxruntime within
    ``rtol``/``atol`` (max-normalised, per output tensor); put the module in eval mode first.
    Raises :class:`ExportError` when export, simplification or the check fails; the file is
    then removed. Returns an :class:`OnnxExport` (usable as a path).
    """
    import onnx

    inputs = as_input_tuple(example_inputs)
    path = os.fspath(path)
    opset = opset or DEFAULT_OPSET
    try:
        with torch.no_grad():
            expected = _flatten(module(*inputs))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, inputs, path, dynamo=False, opset_version=opset,
                                  input_names=[f"input_{i}" for i in range(len(inputs))],
                                  output_names=[f"output_{i}" for i in range(len(expected))])
        model = onnx.load(path)
        simplified = False
        if simplify:
            import onnxsim

            model, simplified = onnxsim.simplify(model)
            if not simplified:
                raise ExportError("onnx-simplifier could not validate the simplified model; "
                                  "export with simplify=False")
            onnx.save(model, path)
        max_error = None
        if check:
            import onnxruntime as ort

            onnx.checker.check_model(model)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feeds = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
            max_error, why = _compare(expected, session.run(None, feeds), rtol, atol)
            if why:
                raise ExportError(f"the ONNX model does not reproduce the module ({why}); try another opset "
                                  "(opset=...) or simplify=False")
        return OnnxExport(path, simplified, max_error, opset)
    except ExportError:
        _remove(path)
        raise
    except Exception as exc:
        _remove(path)
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                          "Check that the module runs on the example inputs and uses ops ONNX supports.") from exc


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
