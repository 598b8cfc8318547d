"""The ``hant`` command line: every subcommand, every error path, the installed script."""

import argparse
import csv
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from hant import __version__
from hant.tools.cli import SUBCOMMANDS, main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ------------------------------------------------------------------ the top level

def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"hant {__version__}"


def test_no_subcommand_is_a_usage_error(capsys):
    code, _, err = _run(capsys)
    assert code == 2 and "usage: hant" in err


def test_unknown_subcommand_is_a_usage_error(capsys):
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


@pytest.mark.parametrize("module_name", SUBCOMMANDS)
def test_every_subcommand_module_adds_one_subcommand_with_help(capsys, module_name):
    subparsers = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module_name).add_parser(subparsers)
    assert len(subparsers.choices) == 1
    name = next(iter(subparsers.choices))
    code, out, _ = _run(capsys, name, "--help")
    assert code == 0 and f"usage: hant {name}" in out


# ------------------------------------------------------------------ hant inspect

def test_inspect_without_a_model_uses_the_bundled_example(capsys):
    code, out, err = _run(capsys, "inspect")
    assert code == 0, err
    assert out.startswith("cost model: roofline")
    assert "1x1x32x32 -> 1x16x32x32" in out and "total (" in out


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_inspect_formats(capsys, shapecost, fmt):
    code, out, _ = _run(capsys, "inspect", "--cost", "shapecost", "--format", fmt)
    assert code == 0
    if fmt == "json":
        assert json.loads(out)["cost_model"] == "shapecost"
    elif fmt == "csv":
        records = list(csv.DictReader(io.StringIO(out)))
        assert records[0]["node"] == "features_0_0" and records[-1]["node"] == "total"
    elif fmt == "markdown":
        assert "| node " in out and "|---" in out
    else:
        assert "| node " not in out and "total (" in out


def test_inspect_top(capsys, shapecost):
    code, out, _ = _run(capsys, "inspect", "--cost", "shapecost", "--format", "json", "--top", "3")
    rows = json.loads(out)["rows"]
    assert code == 0 and len(rows) == 3
    assert [r["latency_s"] for r in rows] == sorted((r["latency_s"] for r in rows), reverse=True)


def test_inspect_float64(capsys, shapecost):
    code, out, _ = _run(capsys, "inspect", "--cost", "shapecost", "--format", "json", "--dtype", "float64")
    assert code == 0 and json.loads(out)["rows"][0]["output_shape"] == [1, 16, 32, 32]


def test_inspect_several_inputs(capsys, shapecost, tmp_path):
    path = tmp_path / "two.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

            def forward(self, x, y):
                return self.a(x) + self.b(y)

        def build():
            return Two()
    """))
    code, out, _ = _run(capsys, "inspect", f"{path}:build", "--input", "2,4", "--input", "2,5",
                        "--cost", "shapecost", "--format", "json")
    rows = {r["node"]: r for r in json.loads(out)["rows"]}
    assert code == 0 and rows["a"]["input_shapes"] == [[2, 4]] and rows["b"]["input_shapes"] == [[2, 5]]


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def _factory_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n")
    return f"{path}:build"


def _saved_module(tmp_path):
    torch.save(_small_net(), tmp_path / "net.pt")
    return str(tmp_path / "net.pt")


def _saved_program(tmp_path):
    torch.export.save(torch.export.export(_small_net(), (torch.randn(1, 3, 8, 8),)), tmp_path / "net.pt2")
    return str(tmp_path / "net.pt2")


@pytest.mark.parametrize("make_spec", [_factory_file, _saved_module, _saved_program])
def test_inspect_loads_every_kind_of_model_file(capsys, shapecost, tmp_path, make_spec):
    code, out, err = _run(capsys, "inspect", make_spec(tmp_path), "--input", "1,3,8,8",
                          "--cost", "shapecost", "--format", "json")
    assert code == 0, err
    conv = json.loads(out)["rows"][0]
    assert conv["kind"] == "conv" and conv["input_shapes"] == [[1, 3, 8, 8]]


def test_inspect_pt2_needs_no_input_shape(capsys, shapecost, tmp_path):
    code, out, err = _run(capsys, "inspect", _saved_program(tmp_path), "--cost", "shapecost", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["input_shapes"] == [[1, 3, 8, 8]]


def test_inspect_torchvision(capsys, shapecost):
    code, out, err = _run(capsys, "inspect", "torchvision:mobilenet_v3_small", "--input", "1,3,64,64",
                          "--cost", "shapecost", "--top", "5")
    assert code == 0, err
    assert "top 5 of" in out


@pytest.mark.slow
def test_resnet50_has_about_4_1_gmacs(capsys):
    code, out, err = _run(capsys, "inspect", "torchvision:resnet50", "--input", "1,3,224,224",
                          "--cost", "flops", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["total"]["macs"] == pytest.approx(4.1e9, rel=0.02)


def test_dot_output(capsys, tmp_path, shapecost):
    path = tmp_path / "graph.dot"
    code, out, err = _run(capsys, "inspect", "--cost", "shapecost", "--dot", str(path))
    assert code == 0, err
    assert "total (" in out and err.strip() == f"wrote {path}"
    text = path.read_text()
    assert text.startswith("digraph") and "features_0_0" in text


def test_svg_output_or_dot_text_beside_it_without_graphviz(capsys, tmp_path, shapecost):
    path = tmp_path / "graph.svg"
    code, _, err = _run(capsys, "inspect", "--cost", "shapecost", "--dot", str(path))
    assert code == 0, err
    if shutil.which("dot"):
        assert err.strip() == f"wrote {path}" and "<svg" in path.read_text()
    else:
        assert err.splitlines()[0].startswith("hant inspect: note: Graphviz 'dot' is not installed")
        assert err.splitlines()[-1] == f"wrote {path.with_suffix('.dot')}"
        assert path.with_suffix(".dot").read_text().startswith("digraph")


# ------------------------------------------------------------------ hant inspect: error paths

@pytest.mark.parametrize("argv, message", [
    (["--input", "1,3,x"], "bad input shape '1,3,x'"),
    (["--input", "1,0,32,32"], "bad input shape '1,0,32,32'"),
    (["--cost", "no-such-model"], "unknown cost model 'no-such-model'; known:"),
    (["torchvision:no_such_net", "--input", "1,3,32,32"], "unknown torchvision model 'no_such_net'"),
    (["torchvision:resnet18"], "needs an input shape: add --input"),
    (["torchvision:resnet18", "--input", "1,5,32,32"], "does not run on example inputs of shape"),
    (["missing.pt"], "model file 'missing.pt' not found"),
    (["missing.py:build"], "model file 'missing.py' not found"),
    (["resnet50"], "cannot read model spec 'resnet50'"),
])
def test_inspect_user_errors_exit_2_with_one_message(capsys, shapecost, argv, message):
    code, out, err = _run(capsys, "inspect", *argv, *([] if "--cost" in argv else ["--cost", "shapecost"]))
    assert code == 2 and out == ""
    assert err.startswith("hant inspect: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_untraceable_model_is_a_trace_error(capsys, shapecost, tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        class Branchy(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x - 1

        def build():
            return Branchy()
    """))
    code, out, err = _run(capsys, "inspect", f"{path}:build", "--input", "2,3", "--cost", "shapecost")
    assert code == 2 and out == ""
    assert err.startswith("hant inspect: error: could not capture Branchy")
    assert "leaf_modules" in err and "branchy.py" in err


def test_dot_to_an_unwritable_place(capsys, tmp_path, shapecost):
    code, _, err = _run(capsys, "inspect", "--cost", "shapecost", "--dot", str(tmp_path / "no" / "such" / "g.dot"))
    assert code == 2 and "hant inspect: error: cannot write the graph" in err


@pytest.mark.parametrize("argv, message", [
    (["--top", "0"], "argument --top: expected a positive integer, got '0'"),
    (["--top", "many"], "argument --top: expected a positive integer, got 'many'"),
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--cost"], "argument --cost: expected one argument"),
    (["a", "b"], "unrecognized arguments: b"),
])
def test_inspect_usage_errors_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, "inspect", *argv)
    assert code == 2 and out == "" and message in err


def test_a_closed_pipe_ends_quietly(monkeypatch, tmp_path, shapecost):
    class ClosedPipe(io.TextIOBase):
        def __init__(self, fd):
            self.fd = fd

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return self.fd

    fd = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(sys, "stdout", ClosedPipe(fd))
    try:
        assert main(["inspect", "--cost", "shapecost"]) == 1
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the installed script

def test_installed_console_script(tmp_path):
    script = shutil.which("hant")
    assert script is not None, "the hant console script is not on PATH; pip install -e '.[test]'"
    done = subprocess.run([script, "inspect", "--format", "csv", "--top", "2"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("node,kind,op,")
    assert len(done.stdout.splitlines()) == 1 + 2 + 1
    failed = subprocess.run([script, "inspect", "--input", "nope"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "bad input shape" in failed.stderr
