"""Reading user images: PNG or JPEG, exactly the model's size and mode, as a [0, 1] tensor.

The format, size and mode are read from the header and checked before any pixel is decoded, so
an image's decoded size is bounded by the model's input whatever its file claims (a 20000x20000
PNG of a few hundred KB is refused without allocating it)."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}


def load_image(source: str | Path | bytes, shape: tuple[int, int, int],
               name: str | None = None) -> torch.Tensor:
    """Decode and check one image; `shape` is the model's (channels, height, width)."""
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read file ({e.strerror})") from None
    x = torch.from_numpy(decode(data, shape, name).copy()).float() / 255.0
    return x.unsqueeze(0) if shape[0] == 1 else x.permute(2, 0, 1)


def canonical_png(data: bytes, shape: tuple[int, int, int], name: str) -> bytes:
    """The image's pixels, checked as load_image checks them, as a plain PNG: what a job carries
    to the workers (no metadata or padding, so its size is bounded by the model's input), and
    load_image reads exactly the same pixels back."""
    buf = io.BytesIO()
    Image.fromarray(decode(data, shape, name)).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes, shape: tuple[int, int, int], name: str) -> np.ndarray:
    """The pixels, (H, W) or (H, W, 3) uint8, after the header checks."""
    c, h, w = shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise InputError(f"{name}: {img.format or 'unknown'} image; use PNG or JPEG")
            if img.size != (w, h):
                raise InputError(f"{name}: image is {img.width}x{img.height}, the model needs "
                                 f"{w}x{h}")
            if img.mode != MODES.get(c):
                raise InputError(f"{name}: image mode {img.mode}, the model needs {MODES.get(c)}")
            img.load()
            return np.asarray(img)
    except Image.DecompressionBombError:  # Pillow's own limit, met in the header before ours
        raise InputError(f"{name}: image too large, the model needs {w}x{h}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: not a readable PNG/JPEG image ({e})") from None


def save_image(x: torch.Tensor, path: Path) -> None:
    """Write a [0, 1] (C, H, W) tensor as an 8-bit PNG."""
    arr = (x.clamp(0, 1) * 255).round().byte()
    arr = arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    Image.fromarray(arr.numpy()).save(path)
