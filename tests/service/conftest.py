import base64
import io
import os
import shutil
from pathlib import Path

import pytest
import redis
import torch
from PIL import Image

from app.stack import RedisServer, Stack
from splitz import checkpoint
from splitz.nets import create_model

TINY = "tiny"  # a narrow SPLITZ LeNet: a few hundred samples take milliseconds
TINY_RS = "tiny-rs"  # the same, split at the input: no Lipschitz search, for many-image jobs


def make_repository(root: Path) -> Path:
    for model_id, split in ((TINY, "conv1"), (TINY_RS, "input")):
        torch.manual_seed(0)
        model = create_model("lenet", "mnist", split, 0.5, width=4)
        with torch.no_grad():
            model.f2[-1].bias[7] = 30.0  # a confident base classifier: class 7 nearly everywhere
        card = checkpoint.ModelCard(id=model_id, arch="lenet", arch_kwargs={"width": 4},
                                    dataset="mnist", split=split, sigma=0.5)
        checkpoint.save(model, card, root / model_id)
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


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server is not installed (CI must install it: see .ci/run)")
    pytest.skip("redis-server is not installed; the service tests need it")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), redis_binary())
    yield server
    if server.proc.poll() is None:
        server.proc.kill()


@pytest.fixture
def make_stack(redis_server, repository, tmp_path):
    stacks = []

    def make(**kw) -> Stack:
        redis.Redis.from_url(redis_server.url).flushall()
        stacks.append(Stack(redis_server, repository, tmp_path, **kw))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


def files(count: int, start: int = 0):
    return [("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(start,
                                                                               start + count)]
