import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from splitz.errors import InputError
from splitz.images import ADAM7, load_image, save_image


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


def handmade_png(width: int, height: int, raw: bytes = b"", depth: int = 8, colour: int = 0,
                 interlace: bool = False) -> bytes:
    """A PNG of the header's fields whose pixel data is `raw` as one complete zlib stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes (a decompression bomb's
    header: Pillow reads it without decoding anything)."""
    return handmade_png(width, height)


@pytest.mark.parametrize("size", [(20_000, 20_000), (4_000, 4_000), (29, 28)])
def test_a_wrong_size_is_refused_from_the_header_before_decoding(monkeypatch, size):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InputError, match="28x28") as e:
        load_image(png_header(*size), (1, 28, 28))
    assert "\n" not in str(e.value)


def test_canonical_png_keeps_the_pixels_and_drops_the_padding():
    from splitz.images import canonical_png

    jpeg = png("RGB", (32, 32), "JPEG")
    assert torch.equal(load_image(canonical_png(jpeg, (3, 32, 32), "a"), (3, 32, 32)),
                       load_image(jpeg, (3, 32, 32)))
    buf = io.BytesIO()
    Image.open(io.BytesIO(noisy_png())).save(buf, "PNG", pnginfo=_padding(2**20))
    padded = buf.getvalue()
    assert len(padded) > 2**20
    small = canonical_png(padded, (1, 28, 28), "a")
    assert len(small) < 2000
    assert torch.equal(load_image(small, (1, 28, 28)), load_image(padded, (1, 28, 28)))


def _padding(size: int):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("padding", "x" * size)
    return info


def test_preprocessing_is_torchvisions_resize_then_center_crop():
    from torchvision import transforms

    from splitz.images import Preprocess, canonical_png

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    prep = Preprocess(resize=64, center_crop=56)
    x = load_image(buf.getvalue(), (3, 56, 56), preprocess=prep)
    reference = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(56),
                                    transforms.PILToTensor()])(img).float() / 255
    assert torch.equal(x, reference)
    assert prep.describe() == "resize 64, center crop 56" and prep.output_size() == (56, 56)
    # a job carries the preprocessed pixels; read back without preprocessing they are the same
    carried = canonical_png(buf.getvalue(), (3, 56, 56), "a", prep)
    assert torch.equal(load_image(carried, (3, 56, 56)), x)


def test_preprocessing_still_checks_the_header_first(monkeypatch):
    from PIL import ImageFile

    from splitz.images import MAX_PIXELS, Preprocess

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(InputError, match=f"{side}x{side}, more than"):
        load_image(png_header(side, side), (1, 28, 28), preprocess=Preprocess(center_crop=28))
    with pytest.raises(InputError, match="mode L, the model needs RGB"):
        load_image(png_header(40, 40), (3, 28, 28), preprocess=Preprocess(center_crop=28))


def test_a_strip_the_resize_would_blow_up_is_refused_from_the_header(monkeypatch):
    from PIL import ImageFile

    from splitz.images import Preprocess

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # 20,000 pixels, a 100-byte file: resized to a shorter side of 256 it would be 5.1 million
    # pixels wide (1.3 billion in all) before the crop
    with pytest.raises(InputError, match="resize 256, center crop 224 would make more than"):
        load_image(png_header(20_000, 1), (1, 224, 224),
                   preprocess=Preprocess(resize=256, center_crop=224))


@pytest.mark.parametrize("size", [(120, 90), (7, 300), (300, 7), (64, 64), (1, 5)])
@pytest.mark.parametrize("resize", [64, (30, 50)])
def test_the_resized_size_is_the_one_torchvision_makes(size, resize):
    from torchvision.transforms import functional

    from splitz.images import Preprocess

    made = functional.resize(Image.new("L", size), list(resize) if isinstance(resize, tuple)
                             else [resize])
    assert Preprocess(resize=resize).resized_pixels(*size) == made.width * made.height


def rows_of_200(width: int, height: int, rows: int | None = None, interlace: bool = False,
                depth: int = 8, samples: int = 1) -> bytes:
    """A PNG's raw pixel data: the first `rows` rows of each pass (all by default), each a
    filter byte 0, then 200s."""
    raw = b""
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        cols, n = len(range(x0, width, dx)), len(range(y0, height, dy))
        if cols and n:
            raw += (b"\0" + bytes([200]) * -(-cols * depth * samples // 8)) * min(n, rows or n)
    return raw


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("depth,colour,shape", [(8, 0, (1, 28, 28)), (4, 0, (1, 28, 28)),
                                                (8, 2, (3, 32, 32))])
def test_a_png_whose_pixel_data_ends_early_is_refused_not_zero_filled(interlace, depth, colour,
                                                                      shape):
    c, h, w = shape

    def made(rows: int | None) -> bytes:
        raw = rows_of_200(w, h, rows, interlace, depth, c)
        return handmade_png(w, h, raw, depth, colour, interlace)

    x = load_image(made(None), shape)
    assert x.shape == shape and x.min() > 0  # complete: every pixel decoded, none zero-filled
    short = made(3)
    with pytest.raises(InputError, match="pixel data ends before its last row"):
        load_image(short, shape)


def test_pngs_pillow_writes_pass_the_row_check():
    for mode, size in (("L", (28, 28)), ("RGB", (32, 32)), ("L", (1, 5)), ("RGB", (33, 7))):
        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        Image.fromarray(rng.integers(0, 255, shape, np.uint8), mode).save(buf, "PNG")
        c = 3 if mode == "RGB" else 1
        assert load_image(buf.getvalue(), (c, size[1], size[0])).shape == (c, size[1], size[0])
