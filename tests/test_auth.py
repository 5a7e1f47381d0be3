"""API keys on the inference endpoints, the admin token, and no filesystem paths in open answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from server.config import ServeConfig
from server.entrypoints.api import redact_paths
from server.entrypoints.auth import secrets_match
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
KEY = "sk-test-key-123"
TOKEN = "admin-token-xyz"
PROMPT = "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n"


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", api_key=KEY, admin_token=TOKEN, max_batch=4)
    with running_server(config) as (url, _app):
        yield url


def test_secrets_match_is_exact():
    assert secrets_match("abc", "abc")
    assert not secrets_match("abc", "abd") and not secrets_match("ab", "abc") and not secrets_match("abcd", "abc")
    assert not secrets_match("", "abc")


def test_the_key_is_never_printed():
    text = repr(ServeConfig(api_key=KEY, admin_token=TOKEN))
    assert KEY not in text and TOKEN not in text and "api_key=set" in text


@needs_demo
@pytest.mark.parametrize(
    "method,path,body",
    [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1}),
     ("POST", "/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
     ("POST", "/generate", {"prompt": "x", "max_tokens": 1})],
)  # fmt: skip
def test_inference_endpoints_need_the_key(server, method, path, body):
    missing = httpx.request(method, server + path, json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.request(method, server + path, json=body, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.request(method, server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200, ok.text


@needs_demo
def test_the_openai_client_with_the_key(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model="json", prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text.startswith('{"name": "pudo"')
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0).models.list()


@needs_demo
def test_open_endpoints_and_the_admin_token(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server + path).status_code == 200, path
    # The admin API takes the admin token, not the API key.
    assert httpx.get(server + "/admin/cache", headers={"Authorization": f"Bearer {KEY}"}).status_code == 403
    assert httpx.get(server + "/admin/cache", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@needs_demo
def test_no_filesystem_paths_in_the_models_list(server):
    r = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert str(DEMO) not in r.text and "/models/" not in r.text
    assert all(not str(m["root"]).startswith("/") for m in r.json()["data"])


def test_ready_reason_names_no_directories(tmp_path):
    config = ServeConfig(model=tmp_path / "no-such-model", adapters=tmp_path)
    with pytest.raises(RuntimeError) as failed, running_server(config, ready_timeout=60):
        pass  # running_server raises with /ready's answer once the reason is not "loading"
    reason = str(failed.value)
    assert "loading" not in reason and str(tmp_path) not in reason, reason


def test_redact_paths_keeps_the_file_name():
    assert redact_paths("OSError: /srv/models/m/config.json missing") == "OSError: .../config.json missing"
    assert redact_paths("see http://host/a/b and ./rel/path") == "see http://host/a/b and ./rel/path"
