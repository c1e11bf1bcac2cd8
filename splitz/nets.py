"""Architectures with an explicit split f = f2 ∘ f1, and a registry that builds them by name.

splitz's own architectures are a flat list of layers that starts with `Normalize` and the first
conv; the split cuts that list. `split="conv1"` (SPLITZ) puts normalization, conv1 and a clipped
ReLU with learnable per-unit thresholds in f1; `split="input"` makes f1 the identity (plain
randomized smoothing: noise on the pixels, normalization moves into f2).

Whole networks made elsewhere (torchvision's ResNets, the CIFAR ResNet of the published smoothing
code) keep their own module names, so their checkpoints load by name. They put BatchNorm right
after their first conv, which leaves no affine + clipped-ReLU f1 to bound: they take only
`split="input"`, with f2 = Normalize + the network.
"""

from collections.abc import Callable
from functools import partial

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

Builder = Callable[..., tuple[nn.Module, list[nn.Module]]]  # (conv1, the layers after it)
NetworkBuilder = Callable[..., nn.Module]  # a whole network that takes normalized images
_REGISTRY: dict[str, Builder] = {}
_NETWORKS: dict[str, NetworkBuilder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return add


def register_network(name: str, builder: NetworkBuilder) -> None:
    _NETWORKS[name] = builder


def list_architectures() -> list[str]:
    return sorted(_REGISTRY.keys() | _NETWORKS.keys())


def is_network(arch: str) -> bool:
    """Whether `arch` is a whole network (f2 = Normalize + it; its checkpoints hold its keys)."""
    return arch in _NETWORKS


def splits(arch: str) -> tuple[str, ...]:
    return ("input",) if is_network(arch) else SPLITS


def create_model(arch: str, dataset: str | DatasetSpec, split: str = "conv1",
                 sigma: float = 0.5, **kwargs) -> SplitModel:
    """Build architecture `arch` for `dataset` (a data set name or a spec), split at `split`."""
    if arch not in list_architectures():
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(list_architectures())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split not in splits(arch):
        raise ValueError(f"architecture {arch} takes split 'input' only: BatchNorm follows its "
                         f"first conv, so there is no affine + clipped-ReLU f1 to bound")
    ds = dataset if isinstance(dataset, DatasetSpec) else spec(dataset)
    if is_network(arch):
        net = _NETWORKS[arch](ds, **kwargs)
        return SplitModel(nn.Sequential(), nn.Sequential(Normalize(ds.mean, ds.std), net), sigma,
                          ds)
    conv1, rest = _REGISTRY[arch](ds, **kwargs)
    out_shape = _output_shape(conv1, ds.input_shape)
    act = ClipReLU(out_shape) if split == "conv1" else nn.ReLU()
    layers = [Normalize(ds.mean, ds.std), conv1, act, *rest]
    cut = 0 if split == "input" else 3
    return SplitModel(nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:]), sigma, ds)


def normalization_mismatch(model: SplitModel) -> str | None:
    """Which Normalize buffer differs from the model's spec (weights that hold another
    normalization than their card says: the weights would win, unseen), or None."""
    for name, m in model.named_modules():
        if isinstance(m, Normalize):
            for key, want in (("mean", model.spec.mean), ("std", model.spec.std)):
                have = getattr(m, key).flatten()
                if not torch.equal(have, torch.tensor(want, dtype=have.dtype)):
                    shown = ", ".join(f"{v:.6g}" for v in have.tolist())
                    return f"{name}.{key} is ({shown}), the card's {key} is {tuple(want)}"
    return None


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


# -- whole networks made elsewhere -------------------------------------------------------------

class CifarResNet(nn.Module):
    """The CIFAR ResNet of the published smoothing code (locuslab/smoothing and
    jh-jeong/smoothing-consistency, archs/cifar_resnet.py, from bearpaw/pytorch-classification),
    with its module names: conv1 (no bias), bn1, relu, layer1..3 of basic blocks (torchvision's
    BasicBlock has the same names and computation, `downsample` = 1x1 conv + BN), avgpool (8x8:
    32x32 inputs only), fc. Depth 6k + 2: cifar_resnet20 and cifar_resnet110 as published."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        from torchvision.models.resnet import BasicBlock as TorchvisionBlock

        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
        k, self.inplanes = (depth - 2) // 6, 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = (
            self._layer(TorchvisionBlock, planes, k, stride)
            for planes, stride in ((16, 1), (32, 2), (64, 2)))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Module:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [block(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x, 1))


def _cifar_resnet(depth: int, ds: DatasetSpec) -> nn.Module:
    return CifarResNet(depth, ds.num_classes, ds.input_shape[0])


def _torchvision(name: str, ds: DatasetSpec, **kwargs) -> nn.Module:
    """torchvision's builder with random weights (never a download); any input size from 32x32."""
    from torchvision import models  # here: only these architectures need it

    if ds.input_shape[0] != 3:
        raise ValueError(f"{name} takes 3-channel images, not {ds.input_shape[0]}")
    return models.get_model(name, weights=None, num_classes=ds.num_classes, **kwargs)


for _depth in (20, 110):
    register_network(f"cifar_resnet{_depth}", partial(_cifar_resnet, _depth))
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
               "wide_resnet101_2")
for _name in TORCHVISION:
    register_network(_name, partial(_torchvision, _name))
