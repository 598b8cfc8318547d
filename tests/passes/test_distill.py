"""Fine-tuning with distillation: it learns, never touches the teacher, and resumes after a kill."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from hant.errors import InputError
from hant.passes.distill import CHECKPOINT_NAME, distillation_loss, finetune


def _models():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3)).eval()
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3))
    return teacher, student


def _loader(seed=0):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


class _Killed(Exception):
    pass


class _KillAfter:
    """A loader that dies (like a kill) after ``n`` batches in total."""

    def __init__(self, loader, n):
        self.loader, self.n, self.seen = loader, n, 0
        self.generator = loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.n:
                raise _Killed
            self.seen += 1
            yield batch


def test_resume_after_kill_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    teacher, student0 = _models()
    kwargs = dict(epochs=3, lr=1e-2, alpha=0.7, progress=False)

    torch.manual_seed(1)
    uninterrupted = finetune(copy.deepcopy(student0), teacher, _loader(), checkpoint_dir=tmp_path / "a", **kwargs)

    torch.manual_seed(1)
    loader = _loader()
    with pytest.raises(_Killed):   # dies in the middle of epoch 2: epoch 1 is checkpointed
        finetune(copy.deepcopy(student0), teacher, _KillAfter(loader, len(loader) + 2),
                 checkpoint_dir=tmp_path / "b", **kwargs)
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    assert state["epoch"] == 1
    torch.manual_seed(999)         # a fresh process: different global RNG state
    resumed = finetune(copy.deepcopy(student0), teacher, _loader(), checkpoint_dir=tmp_path / "b", **kwargs)

    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    changed = any(not torch.equal(a, b) for a, b in zip(student0.state_dict().values(),
                                                         resumed.state_dict().values()))
    assert changed


def test_finetune_reduces_the_distillation_loss_and_leaves_the_teacher_alone():
    teacher, student = _models()
    before_teacher = copy.deepcopy(teacher.state_dict())
    loader = _loader()
    x = torch.cat([b[0] for b in loader])

    def loss():
        with torch.no_grad():
            return float(distillation_loss(student.eval()(x), teacher(x), None, temperature=4.0, alpha=1.0))

    start = loss()
    finetune(student, teacher, loader, epochs=8, lr=2e-2, alpha=1.0, progress=False)
    assert loss() < 0.5 * start
    assert teacher.training is False
    for k, v in before_teacher.items():
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_max_steps_stops_early(tmp_path):
    teacher, student = _models()
    finetune(student, teacher, _loader(), epochs=5, max_steps=3, progress=False, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 3


def test_checkpoint_of_another_run_is_refused(tmp_path):
    teacher, student = _models()
    finetune(copy.deepcopy(student), teacher, _loader(), epochs=1, lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="other settings"):
        finetune(copy.deepcopy(student), teacher, _loader(), epochs=1, lr=5e-2, progress=False,
                 checkpoint_dir=tmp_path)


def test_checkpoint_of_another_network_is_refused(tmp_path):
    teacher, student = _models()
    finetune(copy.deepcopy(student), teacher, _loader(), epochs=1, lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    other = copy.deepcopy(student)
    first = next(name for name, _ in other.named_children())
    other.add_module(f"{first}_renamed", other._modules.pop(first))
    with pytest.raises(InputError, match="different network"):
        finetune(other, teacher, _loader(), epochs=1, lr=1e-2, progress=False, checkpoint_dir=tmp_path)


def test_hard_labels_are_required_when_alpha_below_one():
    teacher, student = _models()
    x_only = DataLoader(torch.randn(8, 1, 6, 6), batch_size=4)
    with pytest.raises(InputError, match="alpha=1.0"):
        finetune(student, teacher, x_only, epochs=1, alpha=0.5, progress=False)
    finetune(student, teacher, x_only, epochs=1, alpha=1.0, progress=False)
