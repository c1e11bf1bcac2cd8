"""No Docker engine here: check the compose file against the official schema and the
Dockerfile's structure statically."""

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"  # vendored: see its README


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_file_is_valid_against_the_official_schema():
    schema = json.loads(SCHEMA.read_text())
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        jsonschema.Draft7Validator(schema).validate(compose(name))


def test_compose_services_are_configured_as_designed():
    s = compose()["services"]
    assert "ports" not in s["redis"]
    assert {"--appendonly", "yes", "--appendfsync", "always", "noeviction"} <= set(
        s["redis"]["command"])
    assert "healthcheck" in s["redis"] and "healthcheck" in s["api"]
    assert s["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = int(s["worker"]["stop_grace_period"].rstrip("s"))
    from app.settings import Settings

    assert grace > Settings().job_timeout_s
    assert s["worker"]["command"] == ["splitz", "worker"]


def test_the_api_and_the_workers_share_one_model_repository_the_api_can_write():
    """Uploads went to the api container's own copy of models/, which no worker reads, and
    the image's models/ belonged to root while the service runs as its own user."""
    s = compose()["services"]
    assert "models:/app/models" in s["api"]["volumes"]
    assert "models:/app/models" in s["worker"]["volumes"] and "models" in compose()["volumes"]
    user = next(rest for w, rest in dockerfile_instructions() if w == "USER")
    assert ("COPY", f"--chown={user} models ./models") in [
        (w, rest.strip()) for w, rest in dockerfile_instructions()]


def test_workers_are_built_checked_by_their_heartbeat_and_need_no_gpu():
    """The worker inherited the image's HTTP healthcheck (always unhealthy), reserved an NVIDIA
    GPU while running CPU torch (compose up failed without the NVIDIA runtime) and had no
    build: of its own."""
    worker = compose()["services"]["worker"]
    assert worker["build"] == "." and worker["image"] == compose()["services"]["api"]["image"]
    assert worker["healthcheck"]["test"] == ["CMD", "splitz", "worker", "--check"]
    assert "deploy" not in worker
    assert worker["environment"]["SPLITZ_DEVICE"] == "${SPLITZ_DEVICE:-cpu}"
    gpu = compose("docker-compose.gpu.yml")["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and gpu["environment"]["SPLITZ_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH"].startswith("cu")


def ignored(path: str) -> bool:
    """Docker's .dockerignore rule for these patterns: the last pattern that matches wins."""
    import fnmatch

    verdict = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
               for p in prefixes):
            verdict = not keep
    return verdict


def test_the_build_context_is_what_the_dockerfile_copies():
    copied = [src for w, rest in dockerfile_instructions() if w == "COPY"
              for src in rest.split()[:-1] if not src.startswith("--")]
    assert copied and not any(ignored(src) for src in copied)
    assert not ignored("splitz/cli.py") and not ignored("models/mnist-splitz-quick/card.json")
    for heavy in (".venv/lib/x.py", "runs/a/b.pt", ".git/HEAD", "data/MNIST/raw/x",
                  "splitz/__pycache__/cli.cpython-311.pyc"):
        assert ignored(heavy), heavy


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest))
            current = ""
    return lines


def test_dockerfile_is_slim_non_root_and_copies_what_exists():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert words[0] == "ARG" and "FROM" in words
    assert any(w == "FROM" and "slim" in rest for w, rest in ins)
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    for w, rest in ins:
        if w == "COPY":
            for src in rest.split()[:-1]:
                assert src.startswith("--") or (ROOT / src).exists(), src
    cmd = json.loads(next(rest for w, rest in ins if w == "CMD"))
    assert cmd[:2] == ["splitz", "serve"]
    assert "HEALTHCHECK" in words and "EXPOSE" in words
