"""Data sets: their specs (shape, classes, normalization) and torchvision loaders over a data root.

The root defaults to torchvision's usual download folder (~/.cache/splitz/data, or $SPLITZ_DATA);
a user with internet gets the real files downloaded there, an offline machine points it at a copy.
"""

import fcntl
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from . import cifar10_labels
from .errors import InputError, first_line


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


# Test sets of 1000 images that stand in for a data set's (same spec): CIFAR-10's first 1000 test
# images with their exact pixels, and the same images taken from the offline JPEG copy.
VARIANTS = {"cifar10-exact1000": "cifar10", "cifar10-jpeg1000": "cifar10"}
EXACT_SUBSET = "cifar10-exact-subset.npz"


def spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def default_root() -> Path:
    return Path(os.environ.get("SPLITZ_DATA", Path.home() / ".cache" / "splitz" / "data"))


def load(name: str, train: bool, root: Path | None = None, augment: bool = False) -> Dataset:
    """The data set as tensors in [0, 1] (normalization is part of the model, not the data)."""
    root = Path(root or default_root())
    try:
        return _load(name, train, root, augment)
    except (RuntimeError, OSError) as e:  # torchvision's failed download, an unreadable file
        raise InputError(f"cannot load {name} from {root} ({first_line(e)}): point "
                         "SPLITZ_DATA (or --data-root) at a folder holding it") from None


def _load(name: str, train: bool, root: Path, augment: bool) -> Dataset:
    from torchvision import datasets, transforms  # here: workers never load data (~190 MB)

    if name == "mnist":
        return datasets.MNIST(root, train=train, download=not _has_mnist(root),
                              transform=transforms.ToTensor())
    if name == "cifar10":
        return _cifar10(root, train, augment)
    if name in VARIANTS and not train:
        return _cifar10_first1000(root, exact=name == "cifar10-exact1000")
    raise ValueError(f"unknown data set {name!r}" + (" (a test set only)" * (name in VARIANTS)))


def _has_mnist(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))


def _cifar10(root: Path, train: bool, augment: bool) -> Dataset:
    from torchvision import datasets, transforms

    tf = [transforms.ToTensor()]
    if augment:
        tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *tf]
    jpeg_tar = root / "cifar10-jpeg.tar.xz"
    if jpeg_tar.exists():  # the offline JPEG copy (see shared/data/README.md)
        folder = _extract_once(jpeg_tar, cache_dir() / "cifar10-jpeg")
        split = next(folder.rglob("train" if train else "test"))
        images = datasets.ImageFolder(split, transform=transforms.Compose(tf))
        return images if train else _original_order(images, cifar10_labels.TEST_LABELS)
    return datasets.CIFAR10(root, train=train, download=True, transform=transforms.Compose(tf))


def _original_order(folder: Dataset, labels: str) -> Subset:
    """The JPEG copy's test images in the test set's order: it names the k-th test image of a
    class `<class>/<k:04d>.jpg` (k from 0), and `labels` are the classes in that order."""
    index = {(label, Path(file).stem): i for i, (file, label) in enumerate(folder.samples)}
    seen = [0] * 10
    twins = []
    for y in map(int, labels):
        name = f"{seen[y]:04d}"
        if (y, name) not in index:
            raise FileNotFoundError(f"the CIFAR-10 JPEG copy lacks test image {name} of class {y}")
        twins.append(index[(y, name)])
        seen[y] += 1
    return Subset(folder, twins)


def _cifar10_first1000(root: Path, exact: bool) -> Dataset:
    """The first 1000 CIFAR-10 test images in their original order: exact pixels from the exact
    subset, or their twins in the JPEG copy."""
    path = root / EXACT_SUBSET
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (see shared/data/README.md)")
    with np.load(path) as npz:
        pixels, labels = npz["x_test_first1000"], npz["y_test_first1000"].astype(np.int64)
    if exact:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        return TensorDataset(x, torch.from_numpy(labels))
    return Subset(_cifar10(root, train=False, augment=False), range(len(labels)))


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITZ_CACHE", Path.home() / ".cache" / "splitz"))


def _extract_once(archive: Path, dest: Path) -> Path:
    """Extract the archive into dest unless a finished extraction is there. Processes starting
    together (several trainings) take turns under a lock beside dest: the first extracts, the
    others wait and then find it done, rather than rewrite files another one is reading."""
    done = dest / ".extracted"
    if done.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not done.exists():
            dest.mkdir(exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
            done.touch()
    return dest
