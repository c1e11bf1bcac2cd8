"""The HTTP API over the embedded backend (in-process, no Redis)."""

import io
import json
import time
import zipfile

import pytest
from PIL import Image

from app.backends import EmbeddedBackend
from app.settings import Settings
from splitz import checkpoint, cli
from splitz.images import load_image
from splitz.nets import create_model
from splitz.smoothing import Smooth
from worker.jobs import JobSpec

from .conftest import TINY, b64, png_bytes, version


@pytest.fixture
def client(make_client):
    return make_client()


def upload(data: bytes, name="a.png"):
    return {"image": (name, data, "image/png")}


def wait_for(client, url, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if body["status"] in ("finished", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job not done in {timeout}s: {body}")


def test_certify_multipart_equals_the_engine(client, repository):
    r = client.post("/certify", params={"model": TINY, "seed": 9, "n": 400, "radius": 0.05},
                    files=upload(png_bytes(3)))
    assert r.status_code == 200, r.text
    got = r.json()
    smooth = Smooth.from_checkpoint(checkpoint.load(repository / TINY))
    want = smooth.certify(load_image(png_bytes(3), (1, 28, 28)), n=400, seed=9, radius=0.05)[0]
    for key in ("prediction", "radius", "n_a", "p_a_lower", "lipschitz", "gamma", "seed",
                "model_sha256", "certified"):
        assert got[key] == getattr(want, key), key


@pytest.mark.parametrize("options", [{"bound": "randomized-clopper-pearson"},
                                     {"tolerance": 0.02},
                                     {"bound": "randomized-clopper-pearson", "tolerance": 0.05}])
def test_bound_and_tolerance_give_the_clis_certificate(client, repository, tmp_path, capsys,
                                                      options):
    """POST /certify took neither the CLI's --bound nor its --tolerance. With the seed the
    server drew (and recorded), the CLI now gives the very same certificate."""
    r = client.post("/certify", params={"model": TINY, "n": 3000, "radius": 0.05} | options,
                    files=upload(png_bytes(3)))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["bound"] == options.get("bound", "clopper-pearson")
    assert got["stopping"].startswith("adaptive") == ("tolerance" in options)
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(3))
    assert cli.main(["certify", str(image), "--model", str(repository / TINY), "--n", "3000",
                     "--radius", "0.05", "--seed", str(got["seed"]), "--json", "--quiet",
                     *(f"--{k}={v}" for k, v in options.items())]) == 0
    want = json.loads(capsys.readouterr().out)
    drop = {"time_s", "seed_source", "image", "name", "job_id"}
    assert {k: v for k, v in got.items() if k not in drop} == {
        k: v for k, v in want.items() if k not in drop}


def test_the_randomized_bound_with_a_client_seed_is_a_422_saying_why(client):
    """The bound's auxiliary draw comes from the seed: a client choosing the seed chooses the
    draw, and its certificate would carry the server's guarantee."""
    bound = {"bound": "randomized-clopper-pearson"}
    for r in (client.post("/certify", params={"model": TINY, "seed": 1} | bound,
                          files=upload(png_bytes())),
              client.post("/jobs", json={"model": TINY, "seed": 1, "images": [b64(png_bytes())]}
                          | bound)):
        assert r.status_code == 422
        assert "client-chosen seed" in r.json()["error"] and "in advance" in r.json()["error"]
    r = client.post("/certify", params={"model": TINY, "n": 100} | bound,
                    files=upload(png_bytes()))
    assert r.status_code == 200 and r.json()["seed_source"] == "random"


def test_tolerance_is_refused_with_early_stop(client):
    r = client.post("/certify", params={"model": TINY, "radius": 0.05, "early_stop": "true",
                                        "tolerance": 0.02}, files=upload(png_bytes()))
    assert r.status_code == 422 and "tolerance" in r.json()["error"]
    r = client.post("/certify", params={"model": TINY, "bound": "wilson"},
                    files=upload(png_bytes()))
    assert r.status_code == 422 and "bound" in r.json()["error"]


def test_certify_json_base64_and_async_job(client):
    r = client.post("/certify", json={"model": TINY, "image": b64(png_bytes(1)), "n": 200})
    assert r.status_code == 200 and r.json()["prediction"] == 7
    r = client.post("/certify", params={"model": TINY, "wait": "false"}, files=upload(png_bytes()))
    assert r.status_code == 202 and r.headers["Location"] == r.json()["status_url"]
    body = wait_for(client, r.json()["status_url"])
    assert body["status"] == "finished" and len(body["results"]) == 1


def test_batch_job_with_files_and_zip(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            z.writestr(f"z{i}.png", png_bytes(10 + i))
    files = [("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(2)]
    files.append(("zip", ("batch.zip", buf.getvalue(), "application/zip")))
    r = client.post("/jobs", params={"model": TINY, "n": 200}, files=files)
    assert r.status_code == 202, r.text
    body = wait_for(client, r.json()["status_url"])
    assert body["status"] == "finished" and body["progress"] == {"done": 5, "total": 5}
    assert [x["name"] for x in body["results"]] == ["0.png", "1.png", "z0.png", "z1.png", "z2.png"]
    assert len({x["seed"] for x in body["results"]}) == 5  # drawn by the server, per image
    assert {x["seed_source"] for x in body["results"]} == {"random"}


def test_cancel_a_queued_job_and_429_when_the_queue_is_full(make_client):
    client = make_client(max_queue=1)
    slow = client.post("/jobs", params={"model": TINY, "n": 200_000},
                       files=[("images", ("a.png", png_bytes(), "image/png"))] * 3)
    queued = client.post("/jobs", params={"model": TINY}, files=[("images", ("b.png",
                                                                            png_bytes(), "x"))])
    assert slow.status_code == 202 and queued.status_code == 202
    full = client.post("/jobs", params={"model": TINY}, files=[("images", ("c.png", png_bytes(),
                                                                          "image/png"))])
    assert full.status_code == 429 and full.headers["Retry-After"]
    assert client.delete(f"/jobs/{queued.json()['id']}").status_code == 202
    assert client.get(queued.json()["status_url"]).json()["status"] == "canceled"
    assert client.delete(f"/jobs/{slow.json()['id']}").status_code == 202
    assert wait_for(client, slow.json()["status_url"])["status"] == "canceled"
    assert client.delete("/jobs/" + "0" * 32).status_code == 404


def test_api_keys_are_enforced_when_configured(make_client):
    client = make_client(api_keys=["s3cret"])
    assert client.get("/models").status_code == 401
    assert client.get("/models", headers={"X-API-Key": "wrong"}).status_code == 401
    r = client.get("/models", headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and TINY in [m["id"] for m in r.json()]
    assert client.get("/healthz").status_code == 200  # liveness needs no key


def test_oversize_bodies_get_413_declared_or_chunked(make_client):
    client = make_client(max_body_bytes=10_000)
    big = png_bytes(size=(28, 28)) + b"\0" * 20_000
    r = client.post("/certify", params={"model": TINY}, files=upload(big))
    assert r.status_code == 413 and "larger" in r.json()["error"]

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = client.post("/certify", params={"model": TINY}, content=chunks(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def truncated_png() -> bytes:
    data = png_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("params,data,status,match", [
    ({"model": TINY}, b"plain text", 422, "not a readable"),
    ({"model": TINY}, "truncated", 422, "not a readable"),
    ({"model": TINY}, png_bytes(size=(32, 32)), 422, "32x32"),
    ({"model": TINY}, png_bytes(mode="RGB"), 422, "mode RGB"),
    ({"model": TINY, "radius": "nan"}, None, 422, "radius"),
    ({"model": TINY, "radius": "-1"}, None, 422, "radius"),
    ({"model": TINY, "n": "2000000"}, None, 422, "cap"),
    ({"model": TINY, "n": "0"}, None, 422, "n"),
    ({"model": TINY, "alpha": "2"}, None, 422, "alpha"),
    ({"model": "nope"}, None, 404, "unknown model"),
    ({"model": "../tiny"}, None, 404, "invalid model id"),
    ({"model": "..%2Ftiny"}, None, 404, "invalid model id"),
    ({}, None, 422, "model"),
])
def test_bad_input_gets_4xx_with_a_json_error(client, params, data, status, match):
    data = truncated_png() if data == "truncated" else data or png_bytes()
    r = client.post("/certify", params=params, files=upload(data))
    assert r.status_code == status, r.text
    assert match in r.json()["error"]


def test_bad_bodies(client):
    assert client.post("/certify", params={"model": TINY}, content=b"x").status_code == 415
    r = client.post("/certify", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = client.post("/certify", json={"model": TINY, "image": "@@notbase64@@"})
    assert r.status_code == 422 and "base64" in r.json()["error"]
    r = client.post("/jobs", json={"model": TINY, "images": []})
    assert r.status_code == 422 and "images" in r.json()["error"]
    r = client.post("/jobs", params={"model": TINY},
                    files=[("zip", ("z.zip", b"PK-not-a-zip", "application/zip"))])
    assert r.status_code == 422 and "zip" in r.json()["error"]
    assert client.get("/jobs/not-a-job").status_code == 404


def test_health_models_metrics_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/models").json()[0]["dataset"] == "mnist"
    client.post("/certify", params={"model": TINY, "n": 100}, files=upload(png_bytes()))
    text = client.get("/metrics").text
    assert 'splitz_requests_total{method="POST",route="/certify",status="200"} 1.0' in text
    assert 'splitz_jobs_total{status="finished"} 1.0' in text
    assert "splitz_samples_total 200.0" in text and "splitz_queue_depth" in text
    assert client.get("/openapi.json").json()["info"]["title"] == "splitz"
    assert client.get("/docs").status_code == 200



def test_radius_query_stops_early(client):
    r = client.post("/certify", params={"model": TINY, "radius": 0.05, "early_stop": "true",
                                        "n": 100_000}, files=upload(png_bytes()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["certified"] is True and body["samples"] < 100_000 and body["looks"] >= 1
    r = client.post("/certify", params={"model": TINY, "early_stop": "true"},
                    files=upload(png_bytes()))
    assert r.status_code == 422 and "radius" in r.json()["error"]


def test_embedded_wait_returns_when_the_job_ends_not_at_the_deadline(repository):
    backend = EmbeddedBackend(Settings(model_dir=repository))
    try:
        spec = dict(model_id=TINY, **version(repository, TINY),
                    images=[b64(png_bytes())], n=200)
        running = backend.submit(JobSpec(**spec | {"n": 20_000}))
        queued = backend.submit(JobSpec(**spec))  # behind it: one worker thread
        start = time.monotonic()
        backend.cancel(queued)
        assert backend.wait(queued, start + 120).status == "canceled"
        assert backend.wait(running, start + 120).status == "finished"
        assert time.monotonic() - start < 60  # woken by the job, long before the deadline
        assert backend.wait("no-such-job", start + 120) is None
    finally:
        backend.close()


# -- hardening (issue 15) ----------------------------------------------------------------------

def png_bomb() -> bytes:
    """A PNG header claiming 20000x20000 pixels (Pillow's DecompressionBombError)."""
    from tests.unit.test_images import png_header

    return png_header(20_000, 20_000)


def test_a_decompression_bomb_is_a_422_in_both_encodings(client):
    r = client.post("/certify", params={"model": TINY}, files=upload(png_bomb()))
    assert r.status_code == 422 and "28x28" in r.json()["error"]
    r = client.post("/certify", json={"model": TINY, "image": b64(png_bomb())})
    assert r.status_code == 422 and "28x28" in r.json()["error"]


@pytest.mark.parametrize("method,path", [("post", "/certify"), ("post", "/jobs"),
                                         ("get", "/jobs/" + "0" * 32), ("get", "/models")])
def test_api_key_with_a_non_ascii_byte_is_a_401(make_client, method, path):
    client = make_client(api_keys=["s3cret", "clé"])
    r = getattr(client, method)(path, params={"model": TINY}, headers={"X-API-Key": b"s3cr\xe9t"})
    assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
    r = client.get("/models", headers={"X-API-Key": "clé".encode()})
    assert r.status_code == 200


def test_a_missing_model_repository_is_503_and_not_ready(make_client, tmp_path):
    client = make_client(model_dir=tmp_path / "nowhere")
    r = client.get("/models")
    assert r.status_code == 503 and "repository" in r.json()["error"]
    assert client.get("/readyz").status_code == 503


def test_readyz_knows_the_models_in_embedded_mode(client):
    r = client.get("/readyz", params={"model": "nope"})
    assert r.status_code == 503 and "unknown model" in r.json()["reason"]
    assert client.get("/readyz", params={"model": TINY}).status_code == 200


def test_names_and_images_of_unequal_length_are_a_422(client):
    r = client.post("/jobs", json={"model": TINY, "images": [b64(png_bytes(0)), b64(png_bytes(1))],
                                   "names": ["a"]})
    assert r.status_code == 422 and "1 names for 2 images" in r.json()["error"]


def padded_png(seed: int, size: int) -> bytes:
    """A valid 28x28 PNG made `size` bytes long by a text chunk (compresses to nothing)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("padding", "x" * size)
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed))).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_a_zip_that_decompresses_past_the_cap_is_refused_before_decoding(make_client,
                                                                         monkeypatch):
    client = make_client(max_decoded_bytes=1_000_000)
    decoded = []
    monkeypatch.setattr("app.routes.certify.canonical_png",
                        lambda data, shape, name, preprocess: decoded.append(name) or png_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            z.writestr(f"z{i}.png", padded_png(i, 500_000))
    assert len(buf.getvalue()) < 50_000  # small on the wire, 1.5 MB inside
    r = client.post("/jobs", params={"model": TINY}, files=[("zip", ("z.zip", buf.getvalue()))])
    assert r.status_code == 422 and "add up" in r.json()["error"]
    assert decoded == []


def test_jobs_carry_the_checked_pixels_not_the_uploaded_file(client, monkeypatch):
    backend = client.app.state.backend
    specs = []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda spec: specs.append(spec) or submit(spec))
    r = client.post("/jobs", params={"model": TINY, "n": 100, "seed": 5},
                    files=[("images", ("a.png", padded_png(3, 1_500_000), "image/png"))])
    assert r.status_code == 202, r.text
    assert len(specs[0].images[0]) < 2000
    body = wait_for(client, r.json()["status_url"])
    assert body["results"][0]["seed"] == 5 and body["results"][0]["seed_source"] == "client"


def test_metrics_count_jobs_when_they_end_not_when_polled(client):
    ids = [client.post("/certify", params={"model": TINY, "n": 100, "wait": "false"},
                       files=upload(png_bytes(i))).json()["id"] for i in range(3)]
    backend = client.app.state.backend
    for job_id in ids:  # waited on directly: no client ever polls them
        assert backend.wait(job_id, time.monotonic() + 60).status == "finished"
    text = client.get("/metrics").text
    assert 'splitz_jobs_total{status="submitted"} 3.0' in text
    assert 'splitz_jobs_total{status="finished"} 3.0' in text
    assert "splitz_samples_total 600.0" in text


def test_a_503_after_enqueueing_names_the_job(client, monkeypatch):
    from app.backends import BackendUnavailable

    def outage(*args):
        raise BackendUnavailable("queue unavailable: ConnectionError")

    monkeypatch.setattr(client.app.state.backend, "wait", outage)
    r = client.post("/certify", params={"model": TINY, "n": 100}, files=upload(png_bytes()))
    assert r.status_code == 503
    body = r.json()
    assert body["job_id"] and body["status_url"].endswith(f"/jobs/{body['job_id']}")
    assert wait_for(client, body["status_url"])["status"] == "finished"


def test_openapi_declares_parameters_bodies_and_the_error_model(client):
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/certify"]["post"]
    query = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    assert {"model", "n", "n0", "alpha", "seed", "radius", "wait", "early_stop", "bound",
            "tolerance"} <= set(query)
    assert query["bound"]["schema"]["enum"] == ["clopper-pearson", "randomized-clopper-pearson"]
    assert all(query[k]["description"] for k in ("bound", "tolerance"))
    content = op["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "image" in content["application/json"]["schema"]["required"]
    jobs = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert {"images", "zip"} <= set(jobs["multipart/form-data"]["schema"]["properties"])
    for status in ("404", "415", "422", "503"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_cancel_stops_a_running_single_image_job(client, monkeypatch):
    import threading

    smooth, sampling = client.app.state.backend.models.get(TINY), threading.Event()
    certify = smooth.certify
    monkeypatch.setattr(smooth, "certify", lambda *a, **k: sampling.set() or certify(*a, **k))
    r = client.post("/certify", params={"model": TINY, "n": 1_000_000, "wait": "false"},
                    files=upload(png_bytes()))
    url = r.json()["status_url"]
    assert sampling.wait(60)
    assert client.delete(url).status_code == 202
    body = wait_for(client, url)
    assert body["status"] == "canceled" and body["progress"]["done"] == 0


def test_an_imported_model_with_its_own_input_certifies_preprocessed_images(make_client,
                                                                           tmp_path):
    """The API took the input shape from the card's data set name, which an imported model's
    'custom' data set is not (every image failed), and did not preprocess: GET /models lists
    the card, and the job gets the preprocessed pixels."""
    from safetensors.torch import save

    from splitz.importer import import_model

    fields = {"id": "own", "arch": "cifar_resnet20", "sigma": 0.25, "input_shape": [3, 32, 32],
              "classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3,
              "preprocess": {"resize": 32, "center_crop": 32}}
    spec = checkpoint.ModelCard(**fields | {"dataset": "custom", "split": "input"}).spec()
    net = create_model("cifar_resnet20", spec, "input", 0.25).f2[1]
    done = import_model(save(net.state_dict()), fields, tmp_path)
    client = make_client(model_dir=tmp_path)
    card = client.get("/models").json()[0]
    assert card["input_shape"] == [3, 32, 32] and card["preprocess"]["center_crop"] == 32
    photo = io.BytesIO()
    Image.new("RGB", (48, 30), (200, 10, 10)).save(photo, "JPEG")
    r = client.post("/certify", params={"model": "own", "n": 50},
                    files=upload(photo.getvalue(), "photo.jpg"))
    assert r.status_code == 200, r.text
    assert r.json()["preprocess"] == "resize 32, center crop 32"
    assert r.json()["model_sha256"] == done.sha256


def damaged_zip(compression: int) -> bytes:
    """A zip of one image whose compressed bytes are flipped: the decompressor fails (zlib,
    bz2 or lzma's own error) or, where it does not, the CRC check does."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        z.writestr("a.png", png_bytes(seed=3) * 4)
    data = bytearray(buf.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 10, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def encrypted_zip() -> bytes:
    """A zip whose entry says it is encrypted (zipfile then wants a password): the flag bit set
    in the local header (flags at byte 6) and the central directory's entry (byte 8)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", png_bytes())
    data = bytearray(buf.getvalue())
    data[data.find(b"PK\x03\x04") + 6] |= 0x1
    data[data.find(b"PK\x01\x02") + 8] |= 0x1
    return bytes(data)


@pytest.mark.parametrize("archive", [
    damaged_zip(zipfile.ZIP_DEFLATED), damaged_zip(zipfile.ZIP_BZIP2),
    damaged_zip(zipfile.ZIP_LZMA), encrypted_zip()],
    ids=["deflate", "bzip2", "lzma", "encrypted"])
def test_a_damaged_or_encrypted_zip_is_a_422(client, archive):
    r = client.post("/jobs", params={"model": TINY}, files=[("zip", ("z.zip", archive))])
    assert r.status_code == 422 and r.json()["error"].startswith("zip: "), r.text


def test_json_nested_past_the_parsers_depth_is_a_422(client):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/certify", "/jobs"):
        r = client.post(path, params={"model": TINY}, content=deep,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["error"], r.text


def test_a_content_length_that_is_no_number_is_a_400(client):
    r = client.post("/certify", params={"model": TINY}, content=b"{}",
                    headers={"Content-Type": "application/json", "Content-Length": "abc"})
    assert r.status_code == 400 and "Content-Length" in r.json()["error"]
