"""hant.optimize with the "exact" preset on real torchvision networks with randomised BN statistics:
exact in float32 and float64, no BatchNorm left, valid ONNX, idempotent, the user's model untouched,
nothing unused kept, and the result goes through torch.export and torch.compile unchanged."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import max_rel_error, randomize_bn

import hant
from hant.graphs.ops import batchnorm_of
from hant.passes import PassManager

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
SHAPE = (1, 3, 32, 32)  # small, to keep CI fast; every stage still has a spatial extent >= 1


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    return randomize_bn(model, seed=1).to(dtype)


def example(dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=dtype)


@pytest.fixture(scope="module", params=MODELS)
def optimized(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, x = build(request.param), example()
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        result = hant.optimize(model, x, passes="exact", cost="roofline:cpu", check=True, rtol=1e-4, atol=1e-5)
    torch.set_num_threads(threads)
    return request.param, model, state, x, result


def test_exact_preset_holds_every_exact_pass():
    assert set(hant.passes.PRESETS["exact"]) <= set(hant.passes.available())


def test_float32_error_within_1e_4_and_no_batchnorm_left(optimized):
    name, model, _, x, result = optimized
    error = max_rel_error(model(x), result.module(x))
    assert error <= 1e-4, name
    assert result.max_error == pytest.approx(error, rel=1e-3, abs=1e-12)
    assert not any(batchnorm_of(n) for n in result.module.graph.nodes)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())
    assert not result.report.rolled_back, str(result.report)
    assert result.cost_after.latency_s < result.cost_before.latency_s


def test_user_model_is_untouched(optimized):
    _, model, state, _, result = optimized
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    owned = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not any(t.data_ptr() in owned for t in list(result.module.parameters()) + list(result.module.buffers()))


def test_result_holds_nothing_unused(optimized):
    gm = optimized[-1].module
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    fetched = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, module in gm.named_modules():
        if name and not list(module.children()):
            assert name in called, f"unused submodule {name}"
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        assert name in fetched or name.rpartition(".")[0] in called, f"unused tensor {name}"


def test_running_exact_again_changes_nothing(optimized):
    _, _, _, x, result = optimized
    again = PassManager("exact", check=x, fixed_point=True)(result.module)
    assert not again.modified, str(again.report)
    assert again.graph_module.code == result.module.code


def test_report_prints_as_a_table_with_every_pass(optimized):
    text = str(optimized[-1].report)
    for name in hant.passes.PRESETS["exact"]:
        assert name in text
    assert "max rel error" in text and "roofline:cpu" in text
    assert "BatchNorm folded" in text


def test_goes_through_torch_export_and_compile(optimized):
    name, model, _, x, result = optimized
    if name not in ("resnet18", "mobilenet_v2"):
        pytest.skip("torch.export/compile are checked on two of the networks to keep CI fast")
    want = model(x)
    exported = torch.export.export(result.module, (x,))
    assert max_rel_error(want, exported.module()(x)) <= 1e-4
    compiled = torch.compile(result.module, backend="eager")
    assert max_rel_error(want, compiled(x)) <= 1e-4


def test_valid_onnx(optimized, tmp_path):
    import onnx
    import onnxruntime as ort

    name, model, _, x, result = optimized
    exported = hant.export_onnx(result.module, x, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(onnx.load(exported.path))
    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert max_rel_error(model(x), torch.from_numpy(out)) <= 1e-4
    assert not any(node.op_type == "BatchNormalization" for node in onnx.load(exported.path).graph.node)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_float64_error_within_1e_10(name):
    model, x = build(name, torch.float64), example(torch.float64)
    result = hant.optimize(model, x, passes="exact", rtol=1e-10, atol=0.0)
    assert not result.report.rolled_back, str(result.report)
    assert max_rel_error(model(x), result.module(x)) <= 1e-10
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())


def test_refusals_reach_the_report():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.bn_stats = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            y = self.conv(x)
            return self.bn_stats(torch.relu(self.bn(y)) + y)

    model = randomize_bn(Blocks(), 0)
    result = hant.optimize(model, torch.randn(2, 3, 8, 8), passes="cleanup,fuse_bn")
    refused = {d.site: d.reason for d in result.report.decisions_of("fuse_bn", "refused")}
    assert "output has 2 users" in refused["bn"]
    assert "track_running_stats=False" in refused["bn_stats"]
    assert "refused" in str(result.report)


def test_bad_inputs_and_unknown_passes_raise_hant_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(hant.InputError):
        hant.optimize(model, torch.randn(1, 5, 8, 8))
    with pytest.raises(hant.PassError, match="valid passes"):
        hant.optimize(model, torch.randn(1, 3, 8, 8), passes="fuse_bn,nope")


# ------------------------------------------------------------ the `hant optimize` command


def test_cli_writes_every_format_and_the_report(tmp_path, capsys):
    from hant.tools.cli import main
    from hant.tools.examples import EXAMPLE_INPUT_SHAPE, example_network

    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    want = example_network()(x)
    for suffix in (".onnx", ".pt", ".pt2"):
        out = tmp_path / f"net{suffix}"
        report = tmp_path / "report.md"
        assert main(["optimize", "--passes", "exact", "--cost", "roofline:cpu", "--out", str(out),
                     "--report", str(report)]) == 0
        printed = capsys.readouterr().out
        assert "fuse_bn" in printed and "max relative output error" in printed and out.exists()
        assert report.read_text().startswith("# hant optimize") and "| fuse_bn" in report.read_text()
        if suffix == ".pt":
            module = torch.load(out, weights_only=False)
            assert max_rel_error(want, module(x)) <= 1e-5
            assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        if suffix == ".pt2":
            assert max_rel_error(want, torch.export.load(str(out)).module()(x)) <= 1e-5


@pytest.mark.parametrize("argv, message", [
    (["--out", "net.txt"], "suffix picks the format"),
    (["--passes", "fuse_bn,nope"], "valid passes"),
    (["--cost", "nope"], "unknown cost model"),
    (["torchvision:resnet18", "--input", "1,3,x"], "bad input shape"),
    (["--out", "/no/such/folder/net.onnx"], "does not exist"),
])
def test_cli_errors_exit_2_with_one_line(argv, message, capsys):
    from hant.tools.cli import main

    assert main(["optimize", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
