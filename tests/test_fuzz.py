"""Fuzz every endpoint from the server's own OpenAPI schema (schemathesis, 127.0.0.1 only):
no 5xx, and every 4xx carries a JSON error body that says what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from server.config import Limits, ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
TOKEN = "fuzz-admin-token"


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    shutil.copytree(DEMO / "adapters", root)  # admins may register / pin here without touching the demo
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=4, max_tune_jobs=0,
                         limits=Limits(max_tokens=8, max_prompt_tokens=128))  # fmt: skip
    with running_server(config) as (url, _):
        yield url


def _openapi() -> dict:
    # The schema the server serves at /openapi.json, built without loading the model, so that
    # the cases can be generated at collection time; they are sent to the live server below.
    from mixserve.tune_jobs import TuneService
    from server.entrypoints.api import create_app

    return create_app(ServeConfig(), [TuneService()]).openapi()  # as `mixserve serve` builds it


schema = schemathesis.openapi.from_dict(_openapi())


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_4xx_explain_themselves(case, fuzz_url):
    response = case.call(base_url=fuzz_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body.get("error", {}).get("message"), str) and body["error"]["message"], response.text
