"""The digits demo task: fixed data, cached deterministic teachers, and a linearize run end to end."""

import pytest
import torch

import hant
from hant.passes.remove_nonlinearity import fold_chains
from hant.tools.models import LoadedModel
from hant.tools import cmd_linearize, digits
from hant.tools.cli import main

QUICK = dict(epochs=1, batch_size=128)




@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HANT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "digits"


def test_data_is_fixed_upsampled_normalised_and_split():
    a, b = digits.load_data(), digits.load_data(seed=0)
    assert a.train_x.shape == (1438, 1, 32, 32) and a.test_x.shape == (359, 1, 32, 32)
    assert torch.equal(a.test_y, b.test_y)
    assert abs(float(a.train_x.mean())) < 1e-4 and abs(float(a.train_x.std()) - 1) < 1e-3
    other = digits.load_data(seed=1)
    assert not torch.equal(a.test_y, other.test_y)
    assert set(a.train_y.tolist()) == set(range(10))


def test_teacher_training_is_deterministic_and_cached_by_config(cache):
    config = digits.TrainConfig(arch="resnet", **QUICK)
    first = digits.teacher(config=config, progress=False)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and config.key() in files[0].name
    again = digits.train(config, progress=False)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    loaded = digits.teacher(config=config, progress=False)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in first.state_dict().items())
    assert digits.TrainConfig(arch="resnet", epochs=2).key() != config.key()
    with pytest.raises(hant.InputError, match="choose one of"):
        digits.teacher("vgg")


def test_evaluate_counts_correct_predictions():
    data = digits.load_data()

    class AlwaysThree(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    _, test = digits.loaders()
    assert digits.evaluate(AlwaysThree(), test) == pytest.approx(float((data.test_y == 3).float().mean()))


@pytest.mark.slow
def test_linearize_and_finetune_a_digits_teacher_end_to_end(cache, tmp_path):
    teacher = digits.teacher(config=digits.TrainConfig(arch="mobilenet", **QUICK), progress=False)
    train, test = digits.loaders(64)
    data = digits.load_data()
    example = data.test_x[:1]
    result = hant.linearize(teacher, example, [data.train_x[:32]], latency_target=0.8, cost="roofline:cpu",
                            progress=False, max_unit_size=2)
    assert result.report.chosen
    assert result.report.final_latency_s < result.report.baseline_latency_s
    acc_student = digits.evaluate(result.module, test)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tuned = hant.finetune(result.linearised, teacher, train, epochs=1, max_steps=4, progress=False,
                          checkpoint_dir=tmp_path / "ft")
    folded = fold_chains(tuned, hant.cost_models.get("roofline:cpu"), check_inputs=(example,))
    acc_tuned = digits.evaluate(folded, test)
    assert 0.0 <= acc_student <= 1.0 and 0.0 <= acc_tuned <= 1.0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    # the merge after fine-tuning is exact: padding was relocated before fine-tuning
    with torch.no_grad():
        ref, out = tuned(data.test_x[:8]), folded(data.test_x[:8])
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_linearize_runs_and_writes_the_student(cache, tmp_path, monkeypatch, capsys):
    quick = digits.teacher(config=digits.TrainConfig(arch="resnet", **QUICK), progress=False)
    monkeypatch.setattr(cmd_linearize, "load_model", lambda spec: LoadedModel(quick, spec))
    out, report = tmp_path / "student.pt", tmp_path / "report.md"
    code = main(["linearize", "digits:resnet", "--latency-target", "0.95", "--epochs", "1", "--max-steps", "2",
                 "--calib-batches", "1", "--out", str(out), "--report", str(report)])
    assert code == 0
    text = capsys.readouterr().out
    assert "test accuracy: teacher" in text and "chosen" in text
    assert out.exists() and "| unit" in report.read_text()
    student = torch.load(out, weights_only=False)
    assert student(digits.load_data().test_x[:2]).shape == (2, 10)


def test_shifted_training_images_are_translations_and_reproducible():
    data = digits.load_data()
    torch.manual_seed(3)
    train, test = digits.loaders(16, shift=2)
    x, y = next(iter(train))
    torch.manual_seed(3)
    x2, y2 = next(iter(digits.loaders(16, shift=2)[0]))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (16, 1, 32, 32)
    # every image is some training image shifted by at most 2 pixels (edges replicated)
    padded = torch.nn.functional.pad(data.train_x, (2, 2, 2, 2), mode="replicate")
    for image, label in zip(x[:4], y[:4]):
        found = any(torch.equal(image, padded[i, :, dy:dy + 32, dx:dx + 32])
                    for i in torch.nonzero(data.train_y == label).flatten().tolist()
                    for dy in range(5) for dx in range(5))
        assert found
    assert torch.equal(next(iter(test))[0], digits.loaders(16)[1].dataset.tensors[0][:256])
