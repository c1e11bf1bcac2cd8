"""Data sets: their specs (shape, classes, normalization) and torchvision loaders over a data root.

The root defaults to torchvision's usual download folder (~/.cache/splitz/data, or $SPLITZ_DATA);
a user with internet gets the real files downloaded there, an offline machine points it at a copy.
"""

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    input_shape: tuple[int, int, int]  # (channels, height, width)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SPECS = {
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), tuple(str(i) for i in range(10)), (0.1307,), (0.3081,)
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
}


def spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def default_root() -> Path:
    return Path(os.environ.get("SPLITZ_DATA", Path.home() / ".cache" / "splitz" / "data"))


def load(name: str, train: bool, root: Path | None = None, augment: bool = False) -> Dataset:
    """The data set as tensors in [0, 1] (normalization is part of the model, not the data)."""
    root = Path(root or default_root())
    if name == "mnist":
        return datasets.MNIST(root, train=train, download=not _has_mnist(root),
                              transform=transforms.ToTensor())
    if name == "cifar10":
        return _cifar10(root, train, augment)
    raise ValueError(f"unknown data set {name!r}")


def _has_mnist(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))


def _cifar10(root: Path, train: bool, augment: bool) -> Dataset:
    tf = [transforms.ToTensor()]
    if augment:
        tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *tf]
    jpeg_tar = root / "cifar10-jpeg.tar.xz"
    if jpeg_tar.exists():  # the offline JPEG copy (see shared/data/README.md)
        folder = _extract_once(jpeg_tar, cache_dir() / "cifar10-jpeg")
        split = next(folder.rglob("train" if train else "test"))
        return datasets.ImageFolder(split, transform=transforms.Compose(tf))
    return datasets.CIFAR10(root, train=train, download=True, transform=transforms.Compose(tf))


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITZ_CACHE", Path.home() / ".cache" / "splitz"))


def _extract_once(archive: Path, dest: Path) -> Path:
    done = dest / ".extracted"
    if not done.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        done.touch()
    return dest
