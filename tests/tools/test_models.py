"""Model specs, input shapes and example inputs for the command line (hant.tools.models)."""

import textwrap

import pytest
import torch
import torch.nn as nn

from hant.errors import InputError
from hant.tools.examples import EXAMPLE_INPUT_SHAPE, ExampleNet, example_network
from hant.tools.models import load_model, make_inputs, parse_shape


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("text, shape", [("1,3,224,224", (1, 3, 224, 224)), ("2x8", (2, 8)),
                                         (" 1, 3 ,4 ", (1, 3, 4)), ("7", (7,))])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,,3", "1,3,a", "1,0,4", "1,-3", "1.5,2"])
def test_bad_shapes_are_input_errors(text):
    with pytest.raises(InputError, match="bad input shape"):
        parse_shape(text)


def test_make_inputs_is_deterministic_in_the_asked_dtype():
    a = make_inputs([(1, 3, 4, 4), (2, 5)], torch.float64)
    b = make_inputs([(1, 3, 4, 4), (2, 5)], torch.float64)
    assert [t.shape for t in a] == [torch.Size([1, 3, 4, 4]), torch.Size([2, 5])]
    assert all(t.dtype == torch.float64 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], make_inputs([(1, 3, 4, 4)], torch.float64, seed=1)[0])


def test_no_spec_gives_the_example_network_and_its_input_shape():
    loaded = load_model(None)
    assert isinstance(loaded.module, ExampleNet) and not loaded.module.training
    assert loaded.input_shapes == (EXAMPLE_INPUT_SHAPE,)


def test_example_network_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = example_network(), example_network()
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(example_network(seed=1).features[0][0].weight, a.features[0][0].weight)
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    assert a(x).shape == (1, 10)


def test_torchvision_models_load_with_random_weights():
    loaded = load_model("torchvision:resnet18")
    assert type(loaded.module).__name__ == "ResNet" and not loaded.module.training
    assert loaded.name == "torchvision:resnet18" and loaded.input_shapes is None


def test_unknown_torchvision_model_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown torchvision model 'resnet5'.*resnet50"):
        load_model("torchvision:resnet5")


def test_factory_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Linear(4, 3), nn.ReLU()).train()
    """))
    loaded = load_model(f"{path}:build")
    assert isinstance(loaded.module, nn.Sequential) and not loaded.module.training
    assert loaded.name == "my_model.py:build"


@pytest.mark.parametrize("body, spec_tail, message", [
    ("def build():\n    return 3\n", "build", "returned int, not an nn.Module"),
    ("def build():\n    raise RuntimeError('no weights')\n", "build", "build\\(\\) failed: RuntimeError: no weights"),
    ("def make():\n    pass\n", "build", "has no function 'build'; callables there: make"),
    ("def build(:\n", "build", "importing .* failed: SyntaxError"),
    ("import no_such_module_hant\n", "build", "importing .* failed: ModuleNotFoundError"),
    ("def build():\n    pass\n", "not-a-name", "bad factory name"),
])
def test_factory_file_errors(tmp_path, body, spec_tail, message):
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(InputError, match=message):
        load_model(f"{path}:{spec_tail}")


def test_saved_module(tmp_path):
    model = _small_net()
    torch.save(model, tmp_path / "net.pt")
    loaded = load_model(str(tmp_path / "net.pt"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("content, message", [
    (lambda: _small_net().state_dict(), "holds a state_dict, not a module"),
    (lambda: torch.zeros(3), "holds a Tensor, not an nn.Module"),
])
def test_saved_files_that_are_not_modules(tmp_path, content, message):
    torch.save(content(), tmp_path / "thing.pt")
    with pytest.raises(InputError, match=message):
        load_model(str(tmp_path / "thing.pt"))


def test_corrupt_pt_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="could not load .*torch.load"):
        load_model(str(tmp_path / "bad.pt"))


def test_exported_program_keeps_its_example_shapes(tmp_path):
    model, x = _small_net(), torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "net.pt2")
    loaded = load_model(str(tmp_path / "net.pt2"))
    assert loaded.input_shapes == ((1, 3, 8, 8),)
    torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-6, atol=1e-6)


def test_corrupt_pt2_file(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="could not load .*torch.export.load"):
        load_model(str(tmp_path / "bad.pt2"))


@pytest.mark.parametrize("spec, message", [
    ("missing.pt", "model file 'missing.pt' not found"),
    ("missing.pt2", "model file 'missing.pt2' not found"),
    ("missing.py:build", "model file 'missing.py' not found"),
    ("model.py", "names a file but no factory"),
    ("resnet50", "cannot read model spec 'resnet50'; give torchvision:NAME"),
])
def test_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load_model(spec)
