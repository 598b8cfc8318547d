"""The main job end to end on real data: a trained network made faster on this machine, with proof.

:func:`run_demo` takes the bundled digits teacher (:mod:`hant.tools.digits`, a
MobileNetV2-like CNN trained on scikit-learn's handwritten digits; trained once, then
cached) through every kind of pass and measures each step itself:

1. **teacher**: traced; the 10 slowest nodes by the inspect cost model;
2. **exact**: the ``"exact"`` preset (BN folding, linear folding, fusion), checked;
3. **substitute** (lossy, HANT): blocks replaced by distilled faster candidates under a
   latency budget priced by ``substitute_cost`` (default ``measured:cpu-onnxruntime``).
   Its sites are the teacher's module blocks, which exact folding dissolves, so it runs
   on the teacher; its student comes out exact-folded;
4. **remove_nonlinearity** (lossy, DepthShrinker-like) on that student;
5. **fine-tune**: knowledge distillation from the teacher;
6. **ONNX**: export, simplify, and a check of the file against PyTorch with onnxruntime.

At each step it prints the latency of the step's module, *measured* with onnxruntime (CPU,
batch 1, one intra-op thread, interleaved medians against the teacher timed in the same
rounds), the top-1 accuracy on the digits test split, and the max relative output error
against the previous step on the test images. Everything printed is measured in the run;
``report.md`` holds the same numbers. Long work resumes: the substitution run directory
and the fine-tuning checkpoint live in the output folder.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

from hant.cost_models import get as get_cost_model
from hant.errors import PassError
from hant.graphs import trace
from hant.graphs.draw import draw
from hant.graphs.export import export_onnx
from hant.passes import PassManager
from hant.tools import digits
from hant.tools.diff import diff, latency_shares
from hant.tools.report import inspect

__all__ = ["DemoConfig", "DemoStep", "DemoResult", "run_demo", "QUICK", "DEFAULT"]


@dataclass(frozen=True)
class DemoConfig:
    """How much work the demo does. :data:`DEFAULT` is the full demo, :data:`QUICK` the CI run.

    ``substitute_cost`` prices the candidates for the budget (``measured:...`` times them on
    this machine); ``inspect_cost`` prices the nodes of the inspect table and graph colours;
    ``nonlinearity_cost`` prices units of remove_nonlinearity, which removes the activations
    of least output distortion that bring the folded latency to ``nonlinearity_target``. ``candidates`` are the
    substitution families (``identity`` and low-rank ``svd`` keep distillation affordable on
    2 cores; add ``dws``, ``ir``, ... for a wider search); ``sites`` limits substitution to
    those module paths (None: every natural block).
    """
    budget: float = 0.85
    budgets: tuple[float, ...] = (0.85, 0.9, 0.95)
    substitute_cost: str = "measured:cpu-onnxruntime"
    inspect_cost: str = "measured:cpu-onnxruntime"
    nonlinearity_cost: str = "roofline:cpu"
    candidates: tuple[str, ...] = ("identity", "svd")
    sites: tuple[str, ...] | None = None
    steps: int = 60
    calibration_batches: int = 8
    nonlinearity_target: float = 0.9
    max_unit_size: int = 1
    finetune_epochs: int = 6
    finetune_steps: int | None = None
    timing_runs: int = 200
    timing_warmup: int = 20


DEFAULT = DemoConfig()
QUICK = DemoConfig(budget=0.8, budgets=(0.8,), substitute_cost="roofline:cpu", inspect_cost="roofline:cpu",
                   sites=("features.3", "features.5"), steps=3, calibration_batches=1, max_unit_size=1,
                   finetune_epochs=1, finetune_steps=4,
                   timing_runs=15, timing_warmup=3)


@dataclass
class DemoStep:
    """One measured step: ``latency_s`` by onnxruntime, ``teacher_latency_s`` timed in the same rounds."""
    name: str
    what: str
    latency_s: float
    teacher_latency_s: float
    accuracy: float
    max_error: float | None     # max relative output error against the previous step (None for the teacher)
    exact: bool

    @property
    def speedup(self) -> float:
        return self.teacher_latency_s / self.latency_s if self.latency_s else float("inf")

    def line(self) -> str:
        err = "" if self.max_error is None else f", max error vs previous {self.max_error:.2e}"
        return (f"[{self.name}] latency {self.latency_s * 1e3:.3f} ms (teacher {self.teacher_latency_s * 1e3:.3f} ms "
                f"in the same rounds, {self.speedup:.2f}x), accuracy {self.accuracy * 100:.2f}%{err}")


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""
    out: Path
    steps: list[DemoStep] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    onnx_max_error: float | None = None
    graphs_rendered: bool = False
    test_images: int = 0
    probe_images: int = 0

    def table(self, fmt: str = "simple") -> str:
        rows = [[s.name, s.what, f"{s.latency_s * 1e3:.3f}", f"{s.speedup:.2f}x", f"{s.accuracy * 100:.2f}",
                 "" if s.max_error is None else f"{s.max_error:.2e}"] for s in self.steps]
        return tabulate(rows, ["step", "what", "latency ms", "speedup", "accuracy %", "max err vs previous"],
                        tablefmt=fmt, disable_numparse=True)


# ---------------------------------------------------------------- measuring

class _Timer:
    """onnxruntime sessions of each step's module, timed interleaved with the teacher's."""

    def __init__(self, folder: Path, x: torch.Tensor, runs: int, warmup: int):
        self.folder, self.x, self.runs, self.warmup = folder, x, runs, warmup
        self.folder.mkdir(parents=True, exist_ok=True)
        self.teacher: Callable | None = None

    def session(self, module: torch.nn.Module, name: str) -> Callable[[], object]:
        import onnxruntime as ort

        path = export_onnx(module, self.x, self.folder / f"{name}.onnx").path
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: self.x.numpy()}
        return lambda: session.run(None, feed)

    def measure(self, module: torch.nn.Module, name: str) -> tuple[float, float]:
        """Median seconds of ``module`` and of the teacher, in rounds teacher, module, teacher, ..."""
        runner = self.session(module, name)
        if self.teacher is None:
            self.teacher = runner
        pair = {"teacher": self.teacher, name: runner}
        for _ in range(self.warmup):
            for fn in pair.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in pair}
        for _ in range(self.runs):
            for key, fn in pair.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        return statistics.median(times[name]), statistics.median(times["teacher"])


@torch.no_grad()
def _max_error(before: torch.Tensor, after: torch.Tensor) -> float:
    scale = before.abs().max().clamp_min(1e-12)
    return float((after.double() - before.double()).abs().max() / scale)


# ---------------------------------------------------------------- the flow

def run_demo(out: str | os.PathLike = "hant-demo", config: DemoConfig = DEFAULT,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into ``out`` (created; reruns resume) and return every measured number.

    Writes ``report.md``, ``pareto.png``, ``graph_before.svg``/``graph_after.svg`` (``.dot``
    when Graphviz is missing), ``model.onnx``, plus ``steps/*.onnx`` (what was timed),
    ``substitute/`` and ``finetune_b<budget>_e<epochs>/`` (resumable work).
    """
    from hant.passes.distill import finetune
    from hant.passes.remove_nonlinearity import linearize
    from hant.passes.substitute import substitute
    from hant.tools.plots import pareto_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    torch.manual_seed(0)
    data = digits.load_data()
    train_loader, test_loader = digits.loaders(seed=0, data=data)
    x = torch.zeros(digits.INPUT_SHAPE).copy_(data.test_x[:1])
    probe = data.test_x[:256]
    result.test_images, result.probe_images = len(data.test_y), len(probe)
    timer = _Timer(out / "steps", x, config.timing_runs, config.timing_warmup)
    sections: list[str] = []
    previous: list[torch.Tensor] = []

    def record(name: str, what: str, module: torch.nn.Module, exact: bool) -> DemoStep:
        latency, teacher_latency = timer.measure(module, name)
        with torch.no_grad():
            outputs = module.eval()(probe)
        step = DemoStep(name, what, latency, teacher_latency, digits.evaluate(module, test_loader),
                        _max_error(previous[0], outputs) if previous else None, exact)
        previous[:] = [outputs]
        result.steps.append(step)
        echo(step.line())
        return step

    echo("== 1/6 teacher: the digits MobileNetV2-like network (trained once, then cached)")
    teacher = digits.teacher("mobilenet")
    gm = trace(teacher, x)
    table = inspect(gm, cost=config.inspect_cost, top=10)
    echo(table)
    sections.append(f"## 1. Teacher: the 10 slowest nodes\n\n```\n{table}\n```")
    record("teacher", "traced digits:mobilenet", gm, True)

    echo("== 2/6 exact passes (BN folding, linear folding, fusion), checked on real inputs")
    exact = PassManager("exact", cost=None, check=x, fixed_point=True)(gm)
    record("exact", "exact preset", exact.graph_module, True)
    sections.append(f"## 2. Exact passes\n\n{exact.report.to_markdown()}")

    echo(f"== 3/6 substitute under a latency budget of {config.budget:.2f} x teacher, priced by "
         f"{config.substitute_cost} (candidates: {', '.join(config.candidates)}; {config.steps} distillation steps)")
    budget = config.budget
    while True:      # the fastest reachable budget depends on the machine: step up until one is feasible
        try:
            sub = substitute(teacher, x, train_loader, budget=budget,
                             budgets=[b for b in config.budgets if b >= budget],
                             cost=config.substitute_cost, candidates=list(config.candidates),
                             sites=list(config.sites) if config.sites else None, run_dir=out / "substitute",
                             steps=config.steps, calibration_batches=config.calibration_batches,
                             evaluate=lambda m: digits.evaluate(m, test_loader), measure=None)
            break
        except PassError as exc:
            if "no choice meets latency budget" not in str(exc) or budget >= 1.0:
                raise
            budget = round(min(budget + 0.05, 1.0), 2)
            echo(f"{exc}\n-> trying budget {budget:.2f} (the distillation is reused)")
    echo(sub.report())
    record("substitute", f"HANT substitution, budget {budget:.2f}", sub.student, False)
    sections.append(f"## 3. Operator substitution (budget {budget:.2f}, cost {config.substitute_cost})\n\n"
                    f"{sub.report()}\n\nEvery budget solved from the same distillation (predicted by the cost "
                    f"model, accuracy measured on the test split):\n\n{sub.pareto_table()}")

    echo(f"== 4/6 remove_nonlinearity (latency target {config.nonlinearity_target:.2f} x folded, units of up to "
         f"{config.max_unit_size} activation(s), least output distortion, priced by {config.nonlinearity_cost})")
    calib = [b for _, b in zip(range(config.calibration_batches), train_loader)]
    lin = linearize(sub.student, x, calib, latency_target=config.nonlinearity_target, cost=config.nonlinearity_cost,
                    max_unit_size=config.max_unit_size)
    echo(str(lin.report))
    record("remove_nonlinearity", f"{len(lin.removed)} activation(s) removed, chains folded", lin.module, False)
    sections.append(f"## 4. Nonlinearity removal\n\n{lin.report.to_markdown()}")

    echo("== 5/6 fine-tune with knowledge distillation from the teacher")
    student = finetune(lin.module, teacher, train_loader, epochs=config.finetune_epochs,
                       max_steps=config.finetune_steps,
                       checkpoint_dir=out / f"finetune_b{budget:.2f}_e{config.finetune_epochs}")
    record("finetune", f"distillation, {config.finetune_epochs} epoch(s)", student, False)

    echo("== 6/6 export ONNX and check it with onnxruntime")
    exported = export_onnx(student, x, out / "model.onnx")
    result.onnx_max_error = exported.max_error
    result.files["model.onnx"] = Path(exported.path)
    echo(f"wrote {exported.path}: onnxruntime against PyTorch, max relative error {exported.max_error:.2e}")

    result.files["pareto.png"] = Path(pareto_plot(sub.solutions, str(out / "pareto.png"),
                                                  title="substitute: latency against accuracy, per budget"))
    shares_model = get_cost_model(config.inspect_cost)
    final = trace(student, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.files["graph_before"] = draw(gm, out / "graph_before.svg",
                                            shares=latency_shares(shares_model.graph_cost(gm)))
        result.files["graph_after"] = draw(final, out / "graph_after.svg",
                                           shares=latency_shares(shares_model.graph_cost(final)))
    result.graphs_rendered = not any("Graphviz" in str(w.message) for w in caught)
    changes = diff(gm, final, shares_model)
    sections.append(f"## 5. Before against after (`hant diff`)\n\n```\n{changes}\n```")

    _write_report(result, config, sections)
    echo("")
    echo(result.table())
    echo(f"\nwrote {', '.join(str(p) for p in result.files.values())}"
         + ("" if result.graphs_rendered else " (Graphviz 'dot' is not installed: the graphs are DOT text)"))
    return result


def _environment() -> str:
    import onnxruntime as ort

    return (f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider, 1 intra-op thread), "
            f"batch 1, {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")


def _write_report(result: DemoResult, config: DemoConfig, sections: list[str]) -> None:
    graphs = ("graph_before.svg and graph_after.svg" if result.graphs_rendered else
              "graph_before.dot and graph_after.dot (Graphviz `dot` is not installed, so DOT text)")
    text = "\n\n".join([
        "# hant demo: the digits MobileNetV2-like network, made faster on this machine",
        f"Measured in this run: {_environment()}. Latency: onnxruntime, median of {config.timing_runs} runs "
        "interleaved with the teacher (so the speedup compares numbers taken in the same rounds). Accuracy: top-1 "
        f"on the {result.test_images} held-out digits. Max error: max |output - previous step's output| / "
        f"max |previous| on the first {result.probe_images} of them.",
        result.table("github"),
        f"ONNX (`model.onnx`): onnxruntime against PyTorch, max relative error {result.onnx_max_error:.2e}. "
        f"Graphs: {graphs}, nodes coloured by their share of latency ({config.inspect_cost}). "
        "`pareto.png`: latency against accuracy for every substitution budget.",
        *sections,
    ])
    (result.out / "report.md").write_text(text + "\n", encoding="utf-8")
    result.files["report.md"] = result.out / "report.md"
