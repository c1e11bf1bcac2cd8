"""Reading user images: PNG or JPEG, exactly the model's size and mode, as a [0, 1] tensor.

The format, size and mode are read from the header and checked before any pixel is decoded, so
an image's decoded size is bounded by the model's input whatever its file claims (a 20000x20000
PNG of a few hundred KB is refused without allocating it). A model whose card declares
preprocessing (resize, center crop) takes any size up to MAX_PIXELS, before and after the resize,
and certifies the result."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, PositiveInt

from .errors import InputError

FORMATS = ("PNG", "JPEG")
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))  # interlaced PNG's passes: first column and row, column and row steps
MODES = {1: "L", 3: "RGB"}
MAX_PIXELS = 4096 * 4096  # before preprocessing, checked in the header

Size = PositiveInt | tuple[PositiveInt, PositiveInt]


class Preprocess(BaseModel):
    """torchvision's Resize, then CenterCrop, on the decoded 8-bit image (bilinear, antialiased),
    before certification: the certificate's radius is in the pixel space of the result."""

    model_config = ConfigDict(extra="forbid")
    resize: Size | None = None  # an int sets the shorter side (aspect kept); (height, width) both
    center_crop: Size | None = None  # (height, width); an int is a square

    def output_size(self) -> tuple[int, int] | None:
        """The (height, width) every image ends at, None where it depends on the image."""
        if self.center_crop is not None:
            return tuple(_sizes(self.center_crop) * 2)[:2]
        return tuple(self.resize) if isinstance(self.resize, tuple) else None

    def describe(self) -> str:
        """E.g. "resize 256, center crop 224"."""
        return ", ".join(f"{key.replace('_', ' ')} {'x'.join(map(str, _sizes(size)))}"
                         for key, size in self.model_dump(exclude_none=True).items())

    def resized_pixels(self, width: int, height: int) -> int:
        """How many pixels the resize makes of a width x height image (as torchvision's Resize
        sizes it), before the crop: a 1 x 20,000 strip resized to a shorter side of 256 would
        be 5 million pixels wide."""
        if self.resize is None:
            return width * height
        if isinstance(self.resize, tuple):
            return self.resize[0] * self.resize[1]
        short, long = sorted((width, height))
        return self.resize * int(self.resize * long / short)

    def apply(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import functional  # here: only preprocessing models need it

        if self.resize is not None:
            img = functional.resize(img, _sizes(self.resize))
        if self.center_crop is not None:
            img = functional.center_crop(img, _sizes(self.center_crop))
        return img


def _sizes(size: int | tuple[int, int]) -> list[int]:
    return [size] if isinstance(size, int) else list(size)


def load_image(source: str | Path | bytes, shape: tuple[int, int, int],
               name: str | None = None, preprocess: Preprocess | None = None) -> torch.Tensor:
    """Decode and check one image; `shape` is the model's (channels, height, width)."""
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read file ({e.strerror})") from None
    x = torch.from_numpy(decode(data, shape, name, preprocess).copy()).float() / 255.0
    return x.unsqueeze(0) if shape[0] == 1 else x.permute(2, 0, 1)


def canonical_png(data: bytes, shape: tuple[int, int, int], name: str,
                  preprocess: Preprocess | None = None) -> bytes:
    """The image's pixels, checked (and preprocessed) as load_image does, as a plain PNG: what a
    job carries to the workers (no metadata or padding, so its size is bounded by the model's
    input), and load_image without preprocessing reads exactly the same pixels back."""
    buf = io.BytesIO()
    Image.fromarray(decode(data, shape, name, preprocess)).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes, shape: tuple[int, int, int], name: str,
           preprocess: Preprocess | None = None) -> np.ndarray:
    """The pixels, (H, W) or (H, W, 3) uint8, after the header checks (and preprocessing)."""
    c, h, w = shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise InputError(f"{name}: {img.format or 'unknown'} image; use PNG or JPEG")
            if preprocess is None and img.size != (w, h):
                raise InputError(f"{name}: image is {img.width}x{img.height}, the model needs "
                                 f"{w}x{h}")
            if img.width * img.height > MAX_PIXELS:
                raise InputError(f"{name}: image is {img.width}x{img.height}, more than "
                                 f"{MAX_PIXELS:,} pixels")
            if preprocess is not None and preprocess.resized_pixels(*img.size) > MAX_PIXELS:
                raise InputError(f"{name}: image is {img.width}x{img.height}, which the "
                                 f"model's {preprocess.describe()} would make more than "
                                 f"{MAX_PIXELS:,} pixels")
            if img.mode != MODES.get(c):
                raise InputError(f"{name}: image mode {img.mode}, the model needs {MODES.get(c)}")
            if img.format == "PNG" and _png_rows_missing(data):
                raise InputError(f"{name}: not a readable PNG/JPEG image (its pixel data ends "
                                 "before its last row)")
            img.load()
            if preprocess is not None:
                img = preprocess.apply(img)
                if img.size != (w, h):
                    raise InputError(f"{name}: preprocessed to {img.width}x{img.height}, the "
                                     f"model needs {w}x{h}")
            return np.asarray(img)
    except Image.DecompressionBombError:  # Pillow's own limit, met in the header before ours
        raise InputError(f"{name}: image too large, the model needs {w}x{h}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: not a readable PNG/JPEG image ({e})") from None


def _png_rows_missing(data: bytes) -> bool:
    """Whether a PNG's pixel data (its IDAT chunks, inflated) ends before its last row: Pillow
    takes a zlib stream that ends early for the whole image and fills the rest with zeros.
    Inflated in pieces, never more than the header's size; damage that zlib itself reports is
    left for Pillow to name."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * PNG_SAMPLES.get(colour, 1)
    need = 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            need += rows * (1 + -(-cols * bits // 8))  # a filter byte, then the packed row
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    inflate, rest, got = zlib.decompressobj(), b"".join(chunks), 0
    try:
        while rest and got < need:
            got += len(inflate.decompress(rest, 1 << 20))
            rest = inflate.unconsumed_tail
    except zlib.error:
        return False
    return got < need


def save_image(x: torch.Tensor, path: Path) -> None:
    """Write a [0, 1] (C, H, W) tensor as an 8-bit PNG."""
    arr = (x.clamp(0, 1) * 255).round().byte()
    arr = arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    Image.fromarray(arr.numpy()).save(path)
