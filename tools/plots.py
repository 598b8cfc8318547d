"""Plots (matplotlib, PNG, headless)."""

from __future__ import annotations

from typing import Iterable

__all__ = ["pareto_plot"]


def pareto_plot(solutions: Iterable, path: str, title: str = "latency against accuracy") -> str:
    """Predicted (and, where known, measured) latency against accuracy, one point per budget.

    ``solutions`` have ``budget``, ``predicted_latency_s``, and optional ``measured_latency_s``
    and ``accuracy`` (points without accuracy are plotted against total score instead).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solutions = sorted(solutions, key=lambda s: s.budget)
    have_accuracy = all(s.accuracy is not None for s in solutions)
    y = [s.accuracy * 100 if have_accuracy else s.total_score for s in solutions]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([s.predicted_latency_s * 1e3 for s in solutions], y, "o-", label="predicted latency")
    measured = [(s.measured_latency_s * 1e3, v) for s, v in zip(solutions, y) if s.measured_latency_s is not None]
    if measured:
        ax.plot(*zip(*measured), "s--", label="measured latency")
    for s, v in zip(solutions, y):
        ax.annotate(f"{s.budget:.2f}", (s.predicted_latency_s * 1e3, v), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("test accuracy (%)" if have_accuracy else "total distillation score (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
