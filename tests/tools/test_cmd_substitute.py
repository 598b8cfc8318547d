"""``hant substitute``: the whole flow from the shell on a tiny model and a data file."""

import textwrap

import pytest
import torch

from hant.tools.cli import main

TINY = textwrap.dedent("""
    import torch.nn as nn

    def make():
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
""")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(40, 1, 12, 12, generator=g), "y": torch.randint(0, 10, (40,), generator=g)},
               tmp_path / "data.pt")
    return tmp_path


def test_substitute_writes_a_student_and_the_pareto_table(files, capsys, shapecost):
    torch.manual_seed(0)
    argv = ["substitute", f"{files / 'tiny.py'}:make", "--input", "1,1,12,12", "--data", str(files / "data.pt"),
            "--budgets", "0.95,1.0", "--cost", "shapecost", "--measure", "none", "--candidates", "conv,dws",
            "--activations", "relu", "--select", "conv_k1_*,dws_*", "--score", "replace_one", "--steps", "3",
            "--calibration-batches", "0", "--finetune-epochs", "1", "--run-dir", str(files / "run"),
            "--out", str(files / "student.pt")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "replace-one" in out and "budget" in out and "replace_one" in out
    assert (files / "student.pt").exists()
    assert (files / "run" / "prices.json").exists()
    trained = {p.stem for p in (files / "run" / "jobs").rglob("*.pt")}
    assert trained and trained <= {"conv_k1_relu", "dws_k3_relu", "dws_k5_relu", "dws_k7_relu"}
    # a rerun resumes: nothing is distilled again
    stamps = {p: p.stat().st_mtime_ns for p in (files / "run" / "jobs").rglob("*.pt")}
    torch.manual_seed(0)     # the same teacher (tiny.py builds it with random weights)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (files / "run" / "jobs").rglob("*.pt")} == stamps


def test_bad_counts_are_input_errors(files, capsys):
    code = main(["substitute", f"{files / 'tiny.py'}:make", "--input", "1,1,12,12", "--data",
                 str(files / "data.pt"), "--finetune-epochs", "-1", "--run-dir", str(files / "run")])
    assert code != 0
    assert "must not be negative" in capsys.readouterr().err


def test_a_run_directory_serves_one_teacher(files, capsys, shapecost):
    argv = ["substitute", f"{files / 'tiny.py'}:make", "--input", "1,1,12,12", "--data", str(files / "data.pt"),
            "--budgets", "1.0", "--cost", "shapecost", "--measure", "none", "--candidates", "conv",
            "--activations", "relu", "--steps", "1", "--run-dir", str(files / "run")]
    torch.manual_seed(0)
    assert main(argv) == 0
    torch.manual_seed(1)     # other weights: the finished jobs must not be reused
    assert main(argv) != 0
    assert "different settings (teacher)" in capsys.readouterr().err
