"""hant diff: node matching, changed regions, totals, the CLI and share-coloured drawings."""

import torch

from hant.graphs import trace
from hant.passes import PassManager
from hant.tools.cli import main
from hant.tools.diff import compare, diff, latency_shares
from hant.tools.digits import DigitsMobileNetV2
from tests.helpers import randomize_bn


def _before_after():
    torch.manual_seed(0)
    model = randomize_bn(DigitsMobileNetV2(), seed=0).eval()
    x = torch.randn(1, 1, 32, 32)
    before = trace(model, x)
    after = PassManager("exact", cost=None, check=x)(before).graph_module
    return model, x, before, after


def test_exact_passes_show_as_removed_batchnorms_and_changed_regions():
    _, _, before, after = _before_after()
    result = compare(before, after, "flops")
    status = {n.node: n.status for n in result.nodes}
    bns = [n.name for n in before.graph.nodes if n.op == "call_module" and "BatchNorm" in type(
        before.get_submodule(n.target)).__name__]
    assert bns and all(status[b] == "removed" for b in bns)
    assert any(s == "added" for s in status.values())            # the folded convs
    changed = {r.region for r in result.regions if r.changed}
    assert "features.1" in changed and "classifier" not in changed
    assert result.total_after_s <= result.total_before_s
    text = diff(before, after, "flops")
    assert "features_1_conv_1" in text and "removed" in text and "total latency" in text


def test_identical_graphs_have_no_changes():
    _, _, before, _ = _before_after()
    result = compare(before, before, "flops")
    assert all(n.status == "same" for n in result.nodes)
    assert not any(r.changed for r in result.regions)
    assert "no node changed" in diff(before, before, "flops")


def test_shares_sum_to_one():
    _, _, before, _ = _before_after()
    from hant.cost_models import get

    shares = latency_shares(get("roofline:cpu").graph_cost(before))
    assert abs(sum(shares.values()) - 1.0) < 1e-9 and max(shares.values()) < 1.0


def test_cli_diff_of_saved_modules_draws_coloured_graphs(tmp_path, capsys):
    model, _, _, after = _before_after()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(model, a)
    torch.save(after, b)
    code = main(["diff", str(a), str(b), "--input", "1,1,32,32", "--cost", "roofline:cpu",
                 "--dot", str(tmp_path / "before.dot"), str(tmp_path / "after.dot")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "removed" in out and "features.1" in out
    dot = (tmp_path / "before.dot").read_text()
    assert "fillcolor=\"#ff0000\"" in dot and "%" in dot      # the largest share is pure red


def test_cli_diff_error_is_a_usage_error(capsys):
    assert main(["diff", "missing_a.pt", "missing_b.pt", "--input", "1,1,32,32"]) == 2
    assert "not found" in capsys.readouterr().err
