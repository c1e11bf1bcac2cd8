"""No Docker engine here: check the compose file against the official schema and the
Dockerfile's structure statically."""

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_official_schema():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose())


def test_compose_services_are_configured_as_designed():
    s = compose()["services"]
    assert "ports" not in s["redis"]
    assert {"--appendonly", "yes", "noeviction"} <= set(s["redis"]["command"])
    assert "healthcheck" in s["redis"] and "healthcheck" in s["api"]
    assert s["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    grace = int(s["worker"]["stop_grace_period"].rstrip("s"))
    from app.settings import Settings

    assert grace > Settings().job_timeout_s
    assert s["worker"]["command"] == ["splitz", "worker"]


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
                assert (ROOT / src).exists(), src
    cmd = json.loads(next(rest for w, rest in ins if w == "CMD"))
    assert cmd[:2] == ["splitz", "serve"]
    assert "HEALTHCHECK" in words and "EXPOSE" in words
