import base64
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from app.main import create_app
from app.settings import Settings
from app.stack import RedisServer, Stack
from splitz import checkpoint
from splitz.nets import create_model

TINY = "tiny"  # a narrow SPLITZ LeNet: a few hundred samples take milliseconds
TINY_RS = "tiny-rs"  # the same, split at the input: no Lipschitz search, for many-image jobs


LENET = {"arch": "lenet", "arch_kwargs": {"width": 4}, "dataset": "mnist", "sigma": 0.5}


def confident_lenet(split: str, label: int = 7):
    """A narrow LeNet whose base classifier says `label` nearly everywhere."""
    torch.manual_seed(0)
    model = create_model("lenet", "mnist", split, 0.5, width=4)
    with torch.no_grad():
        model.f2[-1].bias[label] = 30.0
    return model


def make_repository(root: Path) -> Path:
    for model_id, split in ((TINY, "conv1"), (TINY_RS, "input")):
        card = checkpoint.ModelCard(id=model_id, split=split, **LENET)
        checkpoint.save(confident_lenet(split), card, root / model_id)
    return root


def upload(label: int = 7, **card) -> dict:
    """The multipart files of PUT /models/{id}: a confident LeNet split at the input (weights
    as splitz import takes them) and its card."""
    weights = save(confident_lenet("input", label).state_dict())
    fields = LENET | {"split": "input"} | card
    return {"weights": ("lenet.safetensors", weights, "application/octet-stream"),
            "card": ("card.json", json.dumps(fields), "application/json")}


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"))


def sha256(repository: Path, model_id: str) -> str:
    """The weights' sha256 of a model, as certificates name it."""
    return checkpoint.version(repository / model_id)[1]


def version(repository: Path, model_id: str) -> dict[str, str]:
    """The version fields of a job for the model as the repository holds it now (what the API
    puts in a job at submit time)."""
    card, weights = checkpoint.version(repository / model_id)
    return {"model_sha256": weights, "card_sha256": checkpoint.card_digest(card)}


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


@pytest.fixture
def make_client(repository):
    """In-process apps (the embedded backend) over `repository`, closed after the test."""
    clients = []

    def make(**settings) -> TestClient:
        app = create_app(Settings(**{"model_dir": repository, "default_n": 300} | settings))
        clients.append(TestClient(app).__enter__())
        return clients[-1]

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), redis_binary())
    yield server
    if server.proc.poll() is None:
        server.proc.kill()


@pytest.fixture
def make_stack(redis_server, repository, tmp_path):
    stacks = []

    def make(model_dir: Path = repository, **kw) -> Stack:
        redis.Redis.from_url(redis_server.url).flushall()
        stacks.append(Stack(redis_server, model_dir, tmp_path, **kw))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


def files(count: int, start: int = 0):
    return [("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(start,
                                                                               start + count)]
