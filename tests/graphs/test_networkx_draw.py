"""The networkx view and the DOT / SVG drawing."""

from __future__ import annotations

import re
import shutil
import sys

import networkx as nx
import pytest
import torch
import torch.nn as nn

from hant.graphs import draw, share_colour, to_dot, to_networkx, trace


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) + 1.0
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def small():
    return trace(Small().eval(), torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("form", ["symbolic", "export"])
def test_networkx_view_mirrors_the_graph(form, capture):
    _, _, gm = capture("resnet18", form)
    graph = to_networkx(gm)
    fx_nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    assert list(graph.nodes) == [n.name for n in fx_nodes]
    assert nx.is_directed_acyclic_graph(graph)
    expected_edges = {(a.name, n.name) for n in fx_nodes for a in n.all_input_nodes if a.op != "get_attr"}
    assert set(graph.edges) == expected_edges
    kinds = nx.get_node_attributes(graph, "kind")
    assert sum(k == "conv" for k in kinds.values()) == 20 and sum(k == "batchnorm" for k in kinds.values()) == 20
    first_conv = next(name for name, k in kinds.items() if k == "conv")
    attrs = graph.nodes[first_conv]
    assert attrs["shape"] == (1, 64, 16, 16) and attrs["dtype"] == "torch.float32" and attrs["module"] == "conv1"
    assert attrs["target"] == ("conv1 (Conv2d)" if form == "symbolic" else "aten.conv2d.default")
    assert graph.nodes["x"]["op"] == "placeholder" and graph.nodes["output"]["kind"] == "output"
    with_weights = to_networkx(gm, include_get_attr=True)
    assert with_weights.number_of_nodes() == len(gm.graph.nodes)
    if form == "export":
        assert with_weights.number_of_nodes() > graph.number_of_nodes()
        assert with_weights.has_edge("conv1_weight", first_conv)


def test_networkx_readable_targets(small):
    graph = to_networkx(small)
    targets = nx.get_node_attributes(graph, "target")
    assert targets["conv"] == "conv (Conv2d)" and targets["relu"] == "torch.relu"
    assert targets["mean"] == ".mean" and graph.nodes["add"]["kind"] == "add"


def test_share_colour_runs_from_white_to_red():
    assert share_colour(0.0, 0.5) == "#ffffff"
    assert share_colour(0.5, 0.5) == "#ff0000"
    assert share_colour(0.25, 0.5) == "#ff8080"
    assert share_colour(0.3, 0.0) == "#ffffff"


def test_dot_lists_nodes_edges_labels_and_colours(small):
    shares = {"conv": 0.6, "fc": 0.3, "relu": 0.0, "not_a_node": 1.0}
    text = to_dot(small, shares=shares)
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    for node in small.graph.nodes:
        assert f'"{node.name}" [' in text
    assert '"conv" -> "bn";' in text and '"fc" -> "output";' in text
    conv_line = next(line for line in text.splitlines() if line.strip().startswith('"conv" ['))
    assert "conv (Conv2d)" in conv_line and "2×8×6×6" in conv_line and "60.0%" in conv_line
    assert 'fillcolor="#ff0000"' in conv_line  # the largest share is pure red
    fc_line = next(line for line in text.splitlines() if line.strip().startswith('"fc" ['))
    assert 'fillcolor="#ff8080"' in fc_line and "30.0%" in fc_line
    bn_line = next(line for line in text.splitlines() if line.strip().startswith('"bn" ['))
    assert "fillcolor" not in bn_line and "%" not in bn_line  # no share: the default white
    assert "not_a_node" not in text
    assert len(re.findall(r"->", text)) == to_networkx(small).number_of_edges()


def test_dot_escapes_quotes_and_backslashes():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, 1)))
    gm = torch.fx.GraphModule(nn.Module(), graph, class_name='We"ird\\Name')
    text = to_dot(gm)
    assert 'digraph "We\\"ird\\\\Name" {' in text


def test_draw_writes_dot(small, tmp_path):
    written = draw(small, tmp_path / "g.dot", shares={"conv": 1.0})
    assert written == tmp_path / "g.dot"
    assert written.read_text() == to_dot(small, shares={"conv": 1.0})


def _fake_dot(folder, exit_code: int = 0):
    """A stand-in for Graphviz: records its arguments and stdin, writes a tiny SVG to -o."""
    script = folder / "dot"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "args = sys.argv[1:]\n"
        "text = sys.stdin.read()\n"
        f"if {exit_code}:\n"
        "    sys.stderr.write('syntax error in line 1')\n"
        f"    sys.exit({exit_code})\n"
        "open(args[args.index('-o') + 1], 'w').write('<svg>' + ' '.join(args[:1]) + ' ' + text[:7] + '</svg>')\n"
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in dot is a POSIX script")
def test_draw_svg_runs_graphviz(small, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: _fake_dot(tmp_path) if name == "dot" else None)
    written = draw(small, tmp_path / "g.svg")
    assert written == tmp_path / "g.svg" and written.read_text() == "<svg>-Tsvg digraph</svg>"
    monkeypatch.setattr(shutil, "which", lambda name: _fake_dot(tmp_path, exit_code=1))
    with pytest.raises(RuntimeError, match="syntax error"):
        draw(small, tmp_path / "bad.svg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_draw_svg_with_real_graphviz(small, tmp_path):
    assert "<svg" in draw(small, tmp_path / "g.svg").read_text()


def test_draw_svg_falls_back_to_dot_without_graphviz(small, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="Graphviz 'dot' is not installed"):
        written = draw(small, tmp_path / "h.svg")
    assert written == tmp_path / "h.dot" and written.read_text().startswith("digraph")
    assert not (tmp_path / "h.svg").exists()
