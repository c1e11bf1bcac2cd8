import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from splitz import checkpoint
from splitz.nets import create_model

TINY = "tiny"  # a narrow LeNet: certifying with a few hundred samples takes milliseconds


def make_repository(root: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("lenet", "mnist", "conv1", 0.5, width=4)
    with torch.no_grad():
        model.f2[-1].bias[7] = 30.0  # a confident base classifier: class 7 nearly everywhere
    card = checkpoint.ModelCard(id=TINY, arch="lenet", arch_kwargs={"width": 4}, dataset="mnist",
                                split="conv1", sigma=0.5)
    checkpoint.save(model, card, root / TINY)
    return root


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"))


def png_bytes(seed: int = 0, size=(28, 28), mode="L") -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], generator=g) * 255).byte().numpy()
    img = Image.fromarray(arr)
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
