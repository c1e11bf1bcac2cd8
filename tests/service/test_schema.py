"""Schemathesis against the API's full OpenAPI document (query parameters, both request bodies,
the error model), in-process, with and without API keys: no 5xx, and every answer as documented.
Bounded: a few dozen generated cases per operation, a small n cap and a short synchronous wait."""

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app.main import create_app
from app.settings import Settings

from .conftest import make_repository

KEY = "s3cret"
REPOSITORY = make_repository(Path(tempfile.mkdtemp(prefix="splitz-schema-")))
# "keys": the key is also an admin key, so generated uploads reach the checks past it; "open" has
# no admin key, so uploads are refused there
APPS = {name: create_app(Settings(model_dir=REPOSITORY, default_n=100, max_n=2000,
                                  sync_wait_s=0.2, max_queue=1000, api_keys=keys,
                                  admin_keys=keys))
        for name, keys in (("open", []), ("keys", [KEY]))}
schema = schemathesis.openapi.from_asgi("/openapi.json", APPS["open"])
# What the API promises: no server error, and every status, content type, header and body as
# documented. (Not checked: that schema-valid data is accepted; the schema cannot say that an
# image must decode at the model's size, or that a model id must exist.)
DOCUMENTED = [checks.status_code_conformance, checks.content_type_conformance,
              checks.response_schema_conformance, checks.response_headers_conformance]


@pytest.fixture(scope="module", params=sorted(APPS))
def app(request):
    with TestClient(APPS[request.param]):  # runs the lifespan: the backend lives in app.state
        yield request.param


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_answers_as_documented(case, app):
    headers = dict(case.headers or {})  # the generated X-API-Key: refused where keys are set
    if app == "keys":
        headers["X-API-Key"] = KEY  # then every operation is reached past the key
    # /readyz answers 503 by design when not ready (documented; the other checks see it)
    no_5xx = [] if case.operation.path == "/readyz" else [checks.not_a_server_error]
    case.call_and_validate(app=APPS[app], headers=headers, checks=no_5xx + DOCUMENTED)
