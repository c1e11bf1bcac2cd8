"""Architectures with an explicit split f = f2 ∘ f1, and a registry that builds them by name.

Every architecture is a flat list of layers that starts with `Normalize` and the first conv; the
split cuts that list. `split="conv1"` (SPLITZ) puts normalization, conv1 and a clipped ReLU with
learnable per-unit thresholds in f1; `split="input"` makes f1 the identity (plain randomized
smoothing: noise on the pixels, normalization moves into f2).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DatasetSpec, spec

SPLITS = ("input", "conv1")


class Normalize(nn.Module):
    """(x - mean) / std per channel; part of the model so its Lipschitz factor 1/min(std) counts."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ClipReLU(nn.Module):
    """min(max(x, 0), t) with a learnable threshold t >= 0 for every unit (channel, row, column)."""

    def __init__(self, shape: tuple[int, ...], init: float = 1.0):
        super().__init__()
        self.threshold = nn.Parameter(torch.full(shape, init))

    def upper(self) -> Tensor:
        return self.threshold.clamp(min=0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(F.relu(x), self.upper())


class SplitModel(nn.Module):
    """f(x) = f2(f1(x)); Gaussian noise N(0, sigma^2 I) is added at the split only when asked."""

    def __init__(self, f1: nn.Sequential, f2: nn.Sequential, sigma: float, ds: DatasetSpec):
        super().__init__()
        self.f1, self.f2, self.sigma, self.spec = f1, f2, float(sigma), ds

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.input_shape

    def forward(self, x: Tensor, noise: bool = False) -> Tensor:
        z = self.f1(x)
        if noise:
            z = z + self.sigma * torch.randn_like(z)
        return self.f2(z)


# -- the registry ------------------------------------------------------------------------------

Builder = Callable[..., list[nn.Module]]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return add


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def create_model(arch: str, dataset: str, split: str = "conv1", sigma: float = 0.5,
                 **kwargs) -> SplitModel:
    """Build architecture `arch` for `dataset`, split at `split` ("input" or "conv1")."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(list_architectures())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    ds = spec(dataset)
    conv1, rest = _REGISTRY[arch](ds, **kwargs)
    out_shape = _output_shape(conv1, ds.input_shape)
    act = ClipReLU(out_shape) if split == "conv1" else nn.ReLU()
    layers = [Normalize(ds.mean, ds.std), conv1, act, *rest]
    cut = 0 if split == "input" else 3
    return SplitModel(nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:]), sigma, ds)


def _output_shape(layer: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(layer(torch.zeros(1, *input_shape)).shape[1:])


@register("lenet")
def lenet(ds: DatasetSpec, width: int = 32) -> tuple[nn.Module, list[nn.Module]]:
    """The MNIST CNN (conv 5x5 32 -> conv 5x5 64 -> fc 1024), about 25 MFLOP of f2 per sample."""
    c, h, w = ds.input_shape
    conv1 = nn.Conv2d(c, width, 5, padding=2)
    rest = [
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 1024), nn.ReLU(),
        nn.Linear(1024, ds.num_classes),
    ]
    return conv1, rest


@register("lenet_small")
def lenet_small(ds: DatasetSpec) -> tuple[nn.Module, list[nn.Module]]:
    """The LeNet of the published smoothing tables (Cohen et al.; Jeong & Shin): conv 20 5x5,
    pool, conv 50 5x5, pool, fc 500, no padding; about 4.6 MFLOP per sample."""
    c, h, w = ds.input_shape
    conv1 = nn.Conv2d(c, 20, 5)
    side = [((n - 4) // 2 - 4) // 2 for n in (h, w)]  # after conv, pool, conv, pool
    rest = [
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(50 * side[0] * side[1], 500), nn.ReLU(),
        nn.Linear(500, ds.num_classes),
    ]
    return conv1, rest


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut (1x1 conv + bn where the shape changes), then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


@register("resnet")
def resnet(ds: DatasetSpec, depth: int = 20, width: int = 16) -> tuple[nn.Module, list[nn.Module]]:
    """The CIFAR ResNet of He et al. (depth 6k+2: 20 on a CPU, 110 as in the paper)."""
    if (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6k+2, got {depth}")
    k = (depth - 2) // 6
    conv1 = nn.Conv2d(ds.input_shape[0], width, 3, padding=1)
    blocks, c = [], width
    for stage in range(3):
        c_out = width * 2**stage
        for i in range(k):
            blocks.append(BasicBlock(c, c_out, 2 if stage and i == 0 else 1))
            c = c_out
    rest = [*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, ds.num_classes)]
    return conv1, rest
