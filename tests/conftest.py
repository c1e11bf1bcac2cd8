import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitz.lipschitz import F1Bound
from splitz.nets import create_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MNIST = ROOT / "models" / "mnist-splitz-quick"


def dense_a(bound: F1Bound) -> torch.Tensor:
    """A = W S^-1 as an explicit (units x pixels) float64 matrix, built by pushing a basis."""
    eye = torch.eye(bound.dim, dtype=torch.float64).view(bound.dim, *bound.input_shape)
    return F.conv2d(eye, bound.weight, None, **bound.conv_args).flatten(1).T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lenet():
    return create_model("lenet", "mnist", "conv1", sigma=0.5).eval()


@pytest.fixture
def resnet8():
    return create_model("resnet", "cifar10", "conv1", sigma=0.5, depth=8).eval()


def write_fake_mnist(root: Path, n_train: int = 256, n_test: int = 64) -> Path:
    """Tiny MNIST-format idx files (class k = a bright square at a k-dependent place)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
        for i, k in enumerate(labels):
            r, c = 2 + 2 * (k // 5) * 5, 2 + (k % 5) * 5
            images[i, r:r + 8, c:c + 5] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes())
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"))
