"""Bad input and hostile adapters: bounded requests, clear 4xx errors, nothing merged or loaded that
should not be, and the server keeps serving. uvicorn on 127.0.0.1 with the demo model."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from server.config import Limits, ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
TOKEN = "limits-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "### task: sql\n### input: count the books per author\n### output:\n"


def _hostile_root(root: Path) -> None:
    """The demo adapters plus a zoo of bad ones, all inside the adapter root."""
    for name in ("sql", "json"):
        shutil.copytree(DEMO / "adapters" / name, root / name)
    good = root / "sql"
    cfg = json.loads((good / "adapter_config.json").read_text())
    tensors = {}
    from safetensors.torch import load_file

    tensors = load_file(good / "adapter_model.safetensors")

    def variant(name: str, weights: dict | None = None, config: dict | None = None, raw: bytes | None = None) -> None:
        d = root / "zoo" / name
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(config or cfg))
        if raw is not None:
            (d / "adapter_model.safetensors").write_bytes(raw)
        elif weights is not None:
            save_file(weights, str(d / "adapter_model.safetensors"))

    blob = (good / "adapter_model.safetensors").read_bytes()
    variant("truncated", raw=blob[: len(blob) // 2])
    variant("garbage", raw=b"\x00" * 64)
    variant("huge_header", raw=struct.pack("<Q", 1 << 60) + b"{}")
    key = next(k for k in tensors if "lora_A" in k)
    variant("nan", {**tensors, key: torch.full_like(tensors[key], float("nan"))})
    wrong = {k: (torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v) for k, v in tensors.items()}
    variant("wrong_shapes", wrong)
    other = {k.replace("layers.0.", "layers.99."): v for k, v in tensors.items()}
    variant("other_model", other)
    variant("dora", tensors, {**cfg, "use_dora": True})
    pickled = root / "zoo" / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(cfg))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle, never opened")
    outside = root.parent / "outside"
    shutil.copytree(good, outside)
    os.symlink(outside, root / "zoo" / "escape", target_is_directory=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters") / "root"
    root.mkdir()
    _hostile_root(root)
    limits = Limits(max_tokens=400, max_prompt_tokens=200, max_mix_adapters=3, max_mix_depth=2, max_body_bytes=20_000)
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=1, max_waiting=1,
                         limits=limits)  # fmt: skip
    with running_server(config) as (url, app):
        yield url, app, root


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["message"], body
    return body["error"]


def test_only_good_adapters_in_the_root_are_registered(server):
    _url, app, _ = server
    assert sorted(app.state.server.registry.names()) == ["json", "sql"]
    assert "zoo" in app.state.server.adapter_errors  # a directory without a config: skipped with a reason


@pytest.mark.parametrize(("path", "needle"), [
    ("zoo/truncated", "safetensors"), ("zoo/garbage", "safetensors"), ("zoo/huge_header", "safetensors"),
    ("zoo/nan", "NaN"), ("zoo/wrong_shapes", "but the base model's is"), ("zoo/other_model", "not an adaptable projection of the base"),
    ("zoo/dora", "DoRA"), ("zoo/pickled", "refusing pickle"), ("zoo/escape", "outside the adapter root"),
    ("../outside", "outside the adapter root"), ("/etc", "outside the adapter root"), ("zoo/missing", "not a directory"),
])  # fmt: skip
def test_hostile_adapters_are_refused_and_the_server_keeps_serving(server, path, needle):
    url, app, _ = server
    name = "bad_" + path.replace("/", "_").replace(".", "_")
    r = httpx.post(url + "/admin/adapters", json={"name": name, "path": path}, headers=ADMIN, timeout=30)
    assert needle in _error(r, 400)["message"]
    assert name not in app.state.server.registry
    assert (
        httpx.post(url + "/generate", json={"prompt": PROMPT, "mix": "sql", "max_tokens": 4}, timeout=30).status_code
        == 200
    )


def test_admin_can_register_a_good_adapter_under_the_root(server):
    url, app, root = server
    shutil.copytree(root / "json", root / "json2")
    r = httpx.post(url + "/admin/adapters", json={"name": "json2", "path": "json2"}, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    assert "json2" in app.state.server.registry
    again = httpx.post(url + "/admin/adapters", json={"name": "json2", "path": "json2"}, headers=ADMIN, timeout=30)
    _error(again, 409)


@pytest.mark.parametrize(("body", "needle"), [
    ({"max_tokens": 401}, "max_tokens"),
    ({"prompt": "word " * 400}, "prompt has"),
    ({"stop": ["s"] * 9}, "max_stop_strings"),
    ({"stop": ["x" * 65]}, "stop strings"),
    ({"mix": {"method": "linear", "children": [{"adapter": "sql"}] * 4}}, "max_mix_adapters"),
    ({"mix": {"method": "linear", "children": [{"method": "linear", "children": [
        {"method": "linear", "children": [{"adapter": "sql"}]}]}]}}, "max_mix_depth"),
    ({"mix": {"method": "ties", "children": [{"adapter": "nope"}]}}, "unknown adapter"),
    ({"mix": {"method": "average", "children": [{"adapter": "sql"}]}}, "method"),
    ({"mix": {"method": "ties", "density": 2, "children": [{"adapter": "sql"}]}}, "density"),
    ({"mix": {"method": "dare_ties", "drop_rate": -1, "children": [{"adapter": "sql"}]}}, "drop_rate"),
    ({"mix": {"method": "linear", "children": []}}, "children"),
    ({"temperature": -1}, "temperature"),
])  # fmt: skip
def test_out_of_bounds_requests_get_400_naming_the_limit_and_nothing_is_merged(server, body, needle):
    url, app, _ = server
    cache = app.state.server.cache
    before = (cache.merges_started, len(cache.entries()))
    r = httpx.post(url + "/v1/completions", json={"model": "mixserve-demo", "prompt": PROMPT, **body}, timeout=30)
    assert needle in _error(r, 400)["message"]
    assert (cache.merges_started, len(cache.entries())) == before


def test_body_size_is_bounded_declared_or_chunked(server):
    url, _, _ = server
    big = json.dumps({"model": "sql", "prompt": "x" * 30_000}).encode()
    assert _error(httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}),
                  413)["code"] == "body_too_large"  # fmt: skip

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert _error(r, 413)["code"] == "body_too_large"


def test_a_full_queue_answers_429_with_retry_after(server):
    url, _, _ = server
    # Runs until the 320-token context is full: long enough to keep the one slot busy.
    long = {"prompt": PROMPT, "mix": "sql", "max_tokens": 400, "ignore_eos": True}
    results: list[int] = []

    def send() -> None:
        results.append(httpx.post(url + "/generate", json=long, timeout=60).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]  # one running, one waiting
    for t in threads:
        t.start()
        time.sleep(0.3)
    r = httpx.post(url + "/generate", json=long, timeout=60)
    err = _error(r, 429)
    assert err["code"] == "queue_full" and r.headers["retry-after"]
    for t in threads:
        t.join()
    assert results == [200, 200]


@pytest.mark.parametrize(("merge", "space"), [("merge_members", "lowrank"), ("merge_mix", "dense")])
def test_a_merge_that_runs_out_of_memory_fails_only_its_requests(server, monkeypatch, merge, space):
    """On the member path (lowrank mixes) and the factor path (dense-space mixes)."""
    url, _app, _ = server
    import server.entrypoints.state as state_module

    real = getattr(state_module, merge)

    def flaky(spec, *args, **kw):
        if getattr(spec, "seed", None) == 666:
            raise MemoryError("simulated")
        return real(spec, *args, **kw)

    monkeypatch.setattr(state_module, merge, flaky)
    boom = {"method": "dare_ties", "seed": 666, "space": space, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
    r = httpx.post(url + "/generate", json={"prompt": PROMPT, "mix": boom, "max_tokens": 4}, timeout=30)
    assert _error(r, 507)["code"] == "merge_out_of_memory"
    fine = {**boom, "seed": 1}
    assert (
        httpx.post(url + "/generate", json={"prompt": PROMPT, "mix": fine, "max_tokens": 4}, timeout=30).status_code
        == 200
    )


def test_admin_token_never_appears_in_logs(server, caplog):
    url, _, _ = server
    caplog.set_level("DEBUG")
    httpx.get(url + "/admin/cache", headers={"Authorization": "Bearer wrong-" + TOKEN})
    httpx.get(url + "/admin/cache", headers=ADMIN)
    assert TOKEN not in caplog.text
    assert TOKEN not in httpx.get(url + "/metrics").text
    assert TOKEN not in repr(server[1].state.server.config)
