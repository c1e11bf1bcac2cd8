"""Reading user images: PNG or JPEG, exactly the model's size and mode, as a [0, 1] tensor."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}
MAX_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding


def load_image(source: str | Path | bytes, shape: tuple[int, int, int],
               name: str | None = None) -> torch.Tensor:
    """Decode and check one image; `shape` is the model's (channels, height, width)."""
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read file ({e.strerror})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise InputError(f"{name}: {img.format or 'unknown'} image; use PNG or JPEG")
            if img.width * img.height > MAX_PIXELS:
                raise InputError(f"{name}: image too large ({img.width}x{img.height})")
            img.load()
            pixels, mode, size = np.asarray(img), img.mode, img.size
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable PNG/JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: not a readable PNG/JPEG image ({e})") from None
    c, h, w = shape
    if size != (w, h):
        raise InputError(f"{name}: image is {size[0]}x{size[1]}, the model needs {w}x{h}")
    if mode != MODES.get(c):
        raise InputError(f"{name}: image mode {mode}, the model needs {MODES.get(c)}")
    x = torch.from_numpy(pixels.copy()).float() / 255.0
    return x.unsqueeze(0) if c == 1 else x.permute(2, 0, 1)


def save_image(x: torch.Tensor, path: Path) -> None:
    """Write a [0, 1] (C, H, W) tensor as an 8-bit PNG."""
    arr = (x.clamp(0, 1) * 255).round().byte()
    arr = arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    Image.fromarray(arr.numpy()).save(path)
