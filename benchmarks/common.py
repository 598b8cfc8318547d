"""Timing helpers shared by the benchmark scripts (not part of the library, not run by CI).

The machine is shared and noisy, so variants are timed in interleaved rounds
(A B C A B C ...) and compared by medians within one run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from hant.graphs.export import export_onnx

__all__ = ["interleaved_medians", "ort_session", "environment_line"]


def interleaved_medians(functions: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds A B C A B C ... after warm-up."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_session(module: nn.Module, x: torch.Tensor, threads: int, folder: str, name: str) -> Callable[[], object]:
    """Export ``module`` (checked against onnxruntime) and return a zero-argument runner of its session."""
    import onnxruntime as ort

    path = export_onnx(module, x, os.path.join(folder, f"{name}.onnx")).path
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def environment_line(threads: int, batch: int) -> str:
    """One line naming what the numbers were measured with."""
    import onnxruntime as ort

    return (f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider, intra-op threads "
            f"{threads}), batch {batch}, {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
