import io
import multiprocessing
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from splitz import data
from splitz.errors import InputError


def test_mnist_loads_from_a_data_root(fake_mnist):
    train, test = data.load("mnist", True, fake_mnist), data.load("mnist", False, fake_mnist)
    assert (len(train), len(test)) == (256, 64)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.min() >= 0 and x.max() <= 1 and 0 <= y < 10


def fake_cifar10(root, per_class: int = 1):
    """A JPEG archive laid out like the offline copy; image k of class c is filled with 20c + k."""
    root.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.xz", "w:xz") as tar:
        for split in ("train", "test"):
            for c, name in reversed(list(enumerate(data.spec("cifar10").classes))):
                for k in range(per_class):  # archive order must not matter
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 20 * c + k, np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{k:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_cifar10_jpeg_copy_is_extracted_once_with_standard_labels(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setenv("SPLITZ_CACHE", str(cache))
    monkeypatch.setattr(data.cifar10_labels, "TEST_LABELS", "0123456789")  # one image a class
    fake_cifar10(root)
    test = data.load("cifar10", False, root)
    assert test.dataset.classes == list(data.spec("cifar10").classes)
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3
    assert (cache / "cifar10-jpeg" / ".extracted").exists()
    assert len(data.load("cifar10", True, root, augment=True)) == 10


def _extract_slowly(archive, dest, log):
    real = tarfile.TarFile.extractall

    def slow(self, *a, **k):  # long enough for the others to arrive meanwhile
        with open(log, "a") as f:
            f.write("extract\n")
        time.sleep(0.5)
        return real(self, *a, **k)

    tarfile.TarFile.extractall = slow
    data._extract_once(archive, dest)
    assert (dest / "train").is_dir()  # complete once it returns


def test_processes_starting_together_extract_the_copy_once(tmp_path):
    root, dest, log = tmp_path / "data", tmp_path / "cache" / "cifar10-jpeg", tmp_path / "log"
    fake_cifar10(root)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_extract_slowly, args=(root / "cifar10-jpeg.tar.xz", dest, log))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "extract\n"
    assert (dest / ".extracted").exists()


def test_first_1000_cifar10_test_images_exact_and_their_jpeg_twins(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("SPLITZ_CACHE", str(tmp_path / "cache"))
    fake_cifar10(root, per_class=3)
    labels = np.array([3, 3, 0, 9, 3], np.int64)  # original order: the 2nd "3" is cat/0001.jpg
    monkeypatch.setattr(data.cifar10_labels, "TEST_LABELS", "33093")
    seen = {3: 0, 0: 0, 9: 0}
    pixels = []
    for y in labels:
        pixels.append(np.full((32, 32, 3), 20 * y + seen[y], np.uint8))
        seen[y] += 1
    np.savez(root / data.EXACT_SUBSET, x_test_first1000=np.stack(pixels), y_test_first1000=labels)
    exact = data.load("cifar10-exact1000", False, root)
    jpeg = data.load("cifar10-jpeg1000", False, root)
    assert len(exact) == len(jpeg) == 5
    for i in range(5):
        (xe, ye), (xj, yj) = exact[i], jpeg[i]
        assert int(ye) == yj == labels[i] and xe.shape == xj.shape == (3, 32, 32)
        assert (xe - xj).abs().max() < 2 / 255  # the same image, up to JPEG rounding
    with pytest.raises(ValueError, match="test set only"):
        data.load("cifar10-exact1000", True, root)


def test_the_jpeg_test_set_is_in_the_test_sets_order(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("SPLITZ_CACHE", str(tmp_path / "cache"))
    fake_cifar10(root, per_class=2)
    monkeypatch.setattr(data.cifar10_labels, "TEST_LABELS", "909")
    test = data.load("cifar10", False, root)
    # pixel value 20 c + k marks class c's k-th image: 180 (truck 0), 0 (airplane 0), 181
    assert [(round(float(x.mean()) * 255), y) for x, y in test] == [(180, 9), (0, 0), (181, 9)]
    monkeypatch.setattr(data.cifar10_labels, "TEST_LABELS", "9099")  # a third truck: missing
    with pytest.raises(InputError, match="lacks test image 0002 of class 9"):
        data.load("cifar10", False, root)


def test_the_cifar10_test_labels_are_complete():
    labels = data.cifar10_labels.TEST_LABELS
    assert len(labels) == 10_000 and all(labels.count(str(c)) == 1000 for c in range(10))
    assert labels.startswith("3880661631")  # cat, ship, ship, airplane, frog, ...


def test_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set"):
        data.spec("svhn")


def test_a_data_set_that_cannot_be_loaded_says_where_to_put_it(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(InputError, match=f"cannot load mnist from {tmp_path} .*SPLITZ_DATA"):
        data.load("mnist", train=False, root=tmp_path)
