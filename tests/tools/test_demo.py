"""hant demo --quick end to end: every file written, the report's numbers are the printed ones."""

import re

import onnx
import pytest

from hant.tools.cli import main


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_reports_what_it_printed(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    report = (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    graphs = sorted(p.name for p in out.glob("graph_*"))
    assert graphs in (["graph_after.svg", "graph_before.svg"], ["graph_after.dot", "graph_before.dot"])

    steps = ["teacher", "exact", "substitute", "remove_nonlinearity", "finetune"]
    for step in steps:
        line = re.search(rf"^\[{step}\] latency ([\d.]+) ms .*accuracy ([\d.]+)%", printed, re.M)
        assert line, f"step {step} printed no measurement"
        latency, accuracy = line.groups()
        row = re.search(rf"^\| {step} +\|[^|]*\| +([\d.]+) +\|[^|]*\| +([\d.]+) +\|", report, re.M)
        assert row, f"step {step} missing from report.md"
        assert row.groups() == (latency, accuracy), f"{step}: report {row.groups()} != printed {latency, accuracy}"
        assert float(latency) > 0
    teacher_acc = float(re.search(r"^\[teacher\].*accuracy ([\d.]+)%", printed, re.M).group(1))
    exact_line = re.search(r"^\[exact\].*accuracy ([\d.]+)%, max error vs previous ([\d.e+-]+)", printed, re.M)
    assert float(exact_line.group(1)) == teacher_acc and float(exact_line.group(2)) < 1e-4   # exact is exact
    assert teacher_acc > 90.0                                    # the teacher really was trained
    assert "onnxruntime against PyTorch, max relative error" in printed

    # a rerun resumes: the distillation jobs and the fine-tuning checkpoint are reused
    assert any((out / "substitute").iterdir()) and any(p.name == "finetune.pt" for p in out.glob("finetune_*/*"))


@pytest.mark.slow
def test_optimize_passes_all_runs_lossy_passes_on_data_and_writes_the_report(tmp_path, capsys):
    report, onnx_path = tmp_path / "all.md", tmp_path / "all.onnx"
    code = main(["optimize", "digits:resnet", "--passes", "all", "--budget", "0.9", "--data", "digits",
                 "--report", str(report), "--out", str(onnx_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    text = report.read_text()
    assert "remove_nonlinearity" in text and "fuse_bn" in text and "## Before against after" in text
    accuracy = re.search(r"accuracy on digits: ([\d.]+)% -> ([\d.]+)%", printed)
    assert accuracy and accuracy.group(0) in text
    onnx.checker.check_model(onnx.load(str(onnx_path)))


def test_optimize_lossy_passes_need_data(capsys):
    assert main(["optimize", "digits:resnet", "--passes", "all"]) == 2
    assert "--data" in capsys.readouterr().err
