import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from splitz import data


def test_mnist_loads_from_a_data_root(fake_mnist):
    train, test = data.load("mnist", True, fake_mnist), data.load("mnist", False, fake_mnist)
    assert (len(train), len(test)) == (256, 64)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.min() >= 0 and x.max() <= 1 and 0 <= y < 10


def test_cifar10_jpeg_copy_is_extracted_once_with_standard_labels(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("SPLITZ_CACHE", str(cache))
    with tarfile.open(root / "cifar10-jpeg.tar.xz", "w:xz") as tar:
        for split in ("train", "test"):
            for name in reversed(data.spec("cifar10").classes):  # archive order must not matter
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(buf, "JPEG")
                info = tarfile.TarInfo(f"{split}/{name}/0000.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    test = data.load("cifar10", False, root)
    assert test.classes == list(data.spec("cifar10").classes)
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3
    assert (cache / "cifar10-jpeg" / ".extracted").exists()
    assert len(data.load("cifar10", True, root, augment=True)) == 10


def test_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set"):
        data.spec("svhn")
