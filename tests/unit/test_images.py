import io

import numpy as np
import pytest
import torch
from PIL import Image

from splitz.errors import InputError
from splitz.images import load_image, save_image


def png(mode="L", size=(28, 28), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def noisy_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_reads_grayscale_and_rgb_in_unit_range(tmp_path):
    x = load_image(png(), (1, 28, 28))
    assert x.shape == (1, 28, 28) and x.max().item() == pytest.approx(128 / 255)
    rgb = load_image(png("RGB", (32, 32), "JPEG"), (3, 32, 32))
    assert rgb.shape == (3, 32, 32)
    path = tmp_path / "a.png"
    save_image(torch.rand(1, 28, 28), path)
    assert load_image(path, (1, 28, 28)).shape == (1, 28, 28)


@pytest.mark.parametrize("data,shape,match", [
    (png(size=(32, 28)), (1, 28, 28), "32x28"),
    (png("RGB"), (1, 28, 28), "mode RGB"),
    (png(), (3, 28, 28), "mode L"),
    (b"not an image at all", (1, 28, 28), "not a readable"),
    (noisy_png()[: len(noisy_png()) // 2], (1, 28, 28), "not a readable"),
    (png(fmt="GIF"), (1, 28, 28), "GIF"),
    (png(fmt="BMP"), (1, 28, 28), "BMP"),
    (b"", (1, 28, 28), "not a readable"),
])
def test_bad_images_get_one_line_errors(data, shape, match):
    with pytest.raises(InputError, match=match) as e:
        load_image(data, shape)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "nope.png", (1, 28, 28))
