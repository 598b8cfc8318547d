"""The bundled demo task: scikit-learn's handwritten digits and two small trained teachers.

Every lossy pass (nonlinearity removal, operator substitution) needs a network that was
really trained on real data. ``sklearn.datasets.load_digits`` ships with scikit-learn (no
download): 1797 grey 8x8 images of the digits 0-9. Here they are

* upsampled to 32x32 (bilinear), scaled to [0, 1] and normalised with the training set's
  mean and standard deviation;
* split once, with a fixed seed, into 1438 training and 359 test images.

Two teachers are trained on them deterministically in seconds on a CPU:

* ``"mobilenet"``: a MobileNetV2-like network (inverted residual blocks, BatchNorm, ReLU6);
* ``"resnet"``: a ResNet-like network (basic blocks, BatchNorm, ReLU).

Trained weights are cached under ``cache_dir()`` (``$HANT_CACHE_DIR`` or
``~/.cache/hant``), in a file named after a hash of the full training configuration, so a
second call loads instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from hant.errors import InputError

__all__ = ["DigitsData", "load_data", "loaders", "ShiftedDigits", "TrainConfig", "TEACHERS", "build_teacher", "teacher",
           "train", "evaluate", "cache_dir", "DigitsMobileNetV2", "DigitsResNet", "INPUT_SHAPE", "NUM_CLASSES"]

INPUT_SHAPE = (1, 1, 32, 32)
NUM_CLASSES = 10
_DATA_VERSION = 1          # bump when the preprocessing below changes: it is part of every cache key


@dataclass(frozen=True)
class DigitsData:
    """Preprocessed digits: ``*_x`` are float32 (N, 1, 32, 32), ``*_y`` int64 labels."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


_DATA_CACHE: dict[tuple[int, int, float], DigitsData] = {}


def load_data(*, size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """The digits, upsampled to ``size``x``size``, normalised, split with ``seed``.

    The same arguments always give the same tensors (the split uses its own generator).
    """
    key = (size, seed, test_fraction)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    data = DigitsData(x[train_idx].contiguous(), y[train_idx].contiguous(), x[test_idx].contiguous(),
                      y[test_idx].contiguous())
    _DATA_CACHE[key] = data
    return data


class ShiftedDigits(torch.utils.data.Dataset):
    """Training images, each translated by a random whole number of pixels in ``[-shift, shift]``
    per axis every time it is read (edges replicated). The shifts come from torch's global
    random-number generator, so seeding torch (and restoring its state) reproduces them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shift: int):
        self.padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        self.y, self.shift, self.size = y, shift, x.shape[-2:]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy, dx = (torch.randint(0, 2 * self.shift + 1, (2,))).tolist()
        return self.padded[i, :, dy:dy + self.size[0], dx:dx + self.size[1]], self.y[i]


def loaders(batch_size: int = 64, *, seed: int = 0, data: DigitsData | None = None,
            shift: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``: the training loader shuffles with a seeded generator.

    ``shift > 0`` augments the training images with random translations of up to ``shift``
    pixels (:class:`ShiftedDigits`); the test loader is never augmented.
    """
    data = data or load_data()
    dataset = ShiftedDigits(data.train_x, data.train_y, shift) if shift > 0 else TensorDataset(data.train_x,
                                                                                                data.train_y)
    train = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=256, shuffle=False)
    return train, test


# ---------------------------------------------------------------- teachers

def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [pw expand -> BN -> ReLU6] -> dw 3x3 -> BN -> ReLU6 -> pw project -> BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(cin, hidden, 1) + [nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + [nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class DigitsMobileNetV2(nn.Module):
    """A MobileNetV2-like classifier for 1x32x32 digits (about 6 M multiply-adds)."""

    # (expansion, out channels, repeats, first stride), as in the MobileNetV2 paper's table
    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 2))

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, head: int = 128):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(1, width, 3), nn.ReLU6(inplace=True))]
        cin = width
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*_conv_bn(cin, head, 1), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus (downsampled) x, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                           else nn.Identity())
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.downsample(x))


class DigitsResNet(nn.Module):
    """A ResNet-like classifier for 1x32x32 digits: stem and three stages of one basic block."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, widths[0], 3), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


TEACHERS = {"mobilenet": DigitsMobileNetV2, "resnet": DigitsResNet}


def build_teacher(name: str) -> nn.Module:
    """An untrained teacher; ``name`` is one of ``TEACHERS``."""
    if name not in TEACHERS:
        raise InputError(f"unknown digits teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    return TEACHERS[name]()


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained teacher; its hash names the cache file."""
    arch: str = "mobilenet"
    epochs: int = 12
    lr: float = 4e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    data_seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "data_version": _DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where trained teachers are kept: ``$HANT_CACHE_DIR`` or ``~/.cache/hant``, ``digits/`` inside."""
    root = os.environ.get("HANT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hant")
    return Path(root) / "digits"


@torch.no_grad()
def evaluate(module: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``module`` on ``loader`` as a fraction in [0, 1] (eval mode, restored after)."""
    was_training = module.training
    module.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
    finally:
        module.train(was_training)
    if total == 0:
        raise InputError("evaluate() got an empty loader")
    return correct / total


def train(config: TrainConfig, *, progress: bool = True) -> nn.Module:
    """Train a teacher from scratch, deterministically: same config, same weights. Returns it in eval mode."""
    torch.manual_seed(config.seed)
    model = build_teacher(config.arch)
    train_loader, _ = loaders(config.batch_size, seed=config.seed, data=load_data(seed=config.data_seed))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * len(train_loader))
    model.train()
    bar = tqdm(range(config.epochs), desc=f"train digits:{config.arch}", disable=not progress, leave=False)
    for _ in bar:
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def teacher(name: str = "mobilenet", *, config: TrainConfig | None = None, cache: bool = True,
            progress: bool = True) -> nn.Module:
    """A trained digits teacher in eval mode, loaded from the cache or trained (and cached) now.

    ``name`` picks the architecture (``"mobilenet"`` or ``"resnet"``) unless ``config`` is
    given. Each call returns a fresh module; callers may modify it freely.
    """
    config = config or TrainConfig(arch=name)
    if config.arch not in TEACHERS:
        raise InputError(f"unknown digits teacher {config.arch!r}; choose one of {', '.join(TEACHERS)}")
    path = cache_dir() / f"{config.arch}-{config.key()}.pt"
    if cache and path.exists():
        model = build_teacher(config.arch)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train(config, progress=progress)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)      # atomic: a killed run never leaves a half-written cache file
    return model
