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

__all__ = ["interleaved_rounds", "interleaved_medians", "ort_session", "environment_line"]


def interleaved_rounds(functions: dict[str, Callable[[], object]], runs: int, warmup: int,
                       calls_per_round: int = 1, settle_calls: int = 0) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, timed in rounds A B C A B C ... after ``warmup`` calls of each.

    Each round times ``calls_per_round`` consecutive calls of each function, one sample per call,
    after ``settle_calls`` untimed ones (which pay for switching from the previous function: with
    them the samples are steady-state times, a function called again and again).
    Returns ``{"wall": {name: samples}, "cpu": {name: samples}}`` (cpu: this thread's CPU time,
    which other jobs on a shared machine disturb much less than the wall clock).
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            for _ in range(settle_calls):
                fn()
            for _ in range(calls_per_round):
                start_cpu, start = time.thread_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.thread_time() - start_cpu)
    return {"wall": wall, "cpu": cpu}


def interleaved_medians(functions: dict[str, Callable[[], object]], runs: int, warmup: int,
                        calls_per_round: int = 1) -> dict[str, float]:
    """Median wall seconds per call of each function, timed as :func:`interleaved_rounds` does."""
    wall = interleaved_rounds(functions, runs, warmup, calls_per_round)["wall"]
    return {name: statistics.median(t) for name, t in wall.items()}


def ort_session(module: nn.Module, x: torch.Tensor, threads: int, folder: str, name: str) -> Callable[[], object]:
    """Export ``module`` in eval mode (checked against onnxruntime) and return a zero-argument runner of
    its session (``threads`` intra-op threads, one inter-op thread)."""
    import onnxruntime as ort

    path = export_onnx(module.eval(), x, os.path.join(folder, f"{name}.onnx")).path
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
