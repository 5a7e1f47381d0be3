"""The server end to end: uvicorn on 127.0.0.1, the official ``openai`` client, real SSE and metrics."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SQL = ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
       "how many books have author bemi\n### output:\n")  # fmt: skip
JSON = "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n"
PY = "### task: python\n### input: write sum_even(xs) that returns the sum of the numbers in xs that are even\n### output:\n"
TIES = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
MAX_BATCH = 8
CACHE_BYTES = 350_000  # room for about two 2-adapter member mixes of the demo model (115 KB each) besides a pinned one


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token=TOKEN, max_batch=MAX_BATCH,
                         cache_bytes=CACHE_BYTES)  # fmt: skip
    with running_server(config) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def generate(url: str, prompt: str, mix=None, max_tokens: int = 16) -> dict:
    r = httpx.post(url + "/generate", json={"prompt": prompt, "mix": mix, "max_tokens": max_tokens}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def metrics(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def test_openai_client_completions_and_chat_streaming_and_not(server, client):
    url, _ = server
    ref = generate(url, SQL, "sql")["text"]
    assert ref.startswith("SELECT")
    done = client.completions.create(model="sql", prompt=SQL, max_tokens=16, temperature=0)
    assert done.choices[0].text == ref and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    chunks = list(client.completions.create(model="sql", prompt=SQL, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref and len(chunks) > 2
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": SQL}], max_tokens=16,
                                          temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == ref and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="mixserve-demo", messages=[{"role": "user", "content": SQL}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"mix": "sql"})  # fmt: skip
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == ref
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens > 0


def test_ad_hoc_and_pinned_mixes_and_models_listing(server, client):
    url, _ = server
    adhoc = client.completions.create(model="mixserve-demo", prompt=JSON, max_tokens=24, temperature=0,
                                      extra_body={"mix": TIES})  # fmt: skip
    r = httpx.post(url + "/admin/mixes", json={"name": "sqljson", "mix": TIES}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] > 0 and r.json()["method"] == "ties"
    merges = httpx.get(url + "/admin/cache", headers=ADMIN).json()["merges"]
    pinned = client.completions.create(model="sqljson", prompt=JSON, max_tokens=24, temperature=0)
    assert pinned.choices[0].text == adhoc.choices[0].text  # same spec, same cache entry: no new merge
    assert httpx.get(url + "/admin/cache", headers=ADMIN).json()["merges"] == merges
    listed = {m.id: m for m in client.models.list().data}
    assert {"mixserve-demo", "sql", "json", "python", "pystr", "sqljson"} <= set(listed)
    assert listed["sqljson"].model_extra["parent"] == "mixserve-demo"
    # A different mix really changes the output (the mix is applied, not ignored).
    assert generate(url, JSON, "json", 24)["text"] != generate(url, JSON, None, 24)["text"]


def test_requests_for_different_mixes_batch_together_with_identical_greedy_output(server):
    url, _ = server
    jobs = [
        (SQL, "sql"),
        (JSON, TIES),
        (PY, "python"),
        (SQL, None),
        (JSON, "json"),
        (PY, TIES),
        (SQL, TIES),
        (JSON, None),
    ]
    alone = [generate(url, p, m, 20)["text"] for p, m in jobs]
    before = metrics(url)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: generate(url, job[0], job[1], 20)["text"], jobs))
    after = metrics(url)
    assert together == alone
    steps = total(after, "mixserve_batch_size_count") - total(before, "mixserve_batch_size_count")
    rows = total(after, "mixserve_batch_size_sum") - total(before, "mixserve_batch_size_sum")
    assert rows / steps > 1.5, "the concurrent requests were not batched together"


def test_metrics_are_prometheus_text_and_move_with_traffic(server):
    url, _ = server
    before = metrics(url)
    out = [generate(url, SQL, "sql", 12) for _ in range(3)]
    after = metrics(url)
    generated = sum(o["completion_tokens"] for o in out)
    d = {name: total(after, name) - total(before, name) for name in (
        "mixserve_time_to_first_token_seconds_count", "mixserve_inter_token_latency_seconds_count",
        "mixserve_e2e_request_latency_seconds_count", "mixserve_generated_tokens_total", "mixserve_prompt_tokens_total")}  # fmt: skip
    assert d["mixserve_time_to_first_token_seconds_count"] == 3 and d["mixserve_e2e_request_latency_seconds_count"] == 3
    # One inter-token observation per token after the first; an eos ends a request without a text token.
    assert generated - 3 <= d["mixserve_inter_token_latency_seconds_count"] <= generated
    assert d["mixserve_prompt_tokens_total"] == 3 * out[0]["prompt_tokens"]
    assert "mixserve_inter_token_latency_seconds_bucket{le=0.001,mix=sql}" in after
    assert "mixserve_inter_token_latency_seconds_bucket{le=0.002,mix=sql}" in after
    assert any(k.startswith("mixserve_lora_requests_info{") and "max_lora=8" in k for k in after)
    for name in ("mixserve_requests_running", "mixserve_requests_waiting", "mixserve_mix_cache_bytes",
                 "mixserve_mix_cache_entries", "mixserve_mix_cache_hits_total", "mixserve_mix_cache_misses_total"):  # fmt: skip
        assert name in after, name
    assert total(after, "mixserve_merge_seconds_count") >= 1


def test_single_flight_merge_and_eviction_keep_the_pinned_mix(server):
    url, _ = server
    pin = {"method": "linear", "children": [{"adapter": "python"}, {"adapter": "pystr"}]}
    assert (
        httpx.post(url + "/admin/mixes", json={"name": "code", "mix": pin}, headers=ADMIN, timeout=60).status_code
        == 200
    )
    merges = httpx.get(url + "/admin/cache", headers=ADMIN).json()["merges"]
    fresh = {
        "method": "dare_ties",
        "drop_rate": 0.3,
        "seed": 7,
        "children": [{"adapter": "sql"}, {"adapter": "python"}],
    }
    with cf.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda _: generate(url, SQL, fresh, 8)["text"], range(6)))
    assert len(set(texts)) == 1
    assert httpx.get(url + "/admin/cache", headers=ADMIN).json()["merges"] == merges + 1  # six requests, one merge
    before = metrics(url)
    for seed in range(4):  # more distinct mixes than the budget holds
        generate(url, SQL, {**fresh, "seed": 100 + seed}, 4)
    cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
    assert metrics(url)["mixserve_mix_cache_evictions_total"] > before["mixserve_mix_cache_evictions_total"]
    assert any("code" in e["pins"] for e in cache["entries"])
    assert cache["bytes"] <= CACHE_BYTES
    assert httpx.delete(url + "/admin/mixes/code", headers=ADMIN).status_code == 200
    assert httpx.delete(url + "/admin/mixes/code", headers=ADMIN).status_code == 404


def test_admin_needs_the_bearer_token(server):
    url, _ = server
    assert httpx.get(url + "/admin/cache").status_code == 401
    assert httpx.get(url + "/admin/cache", headers={"Authorization": "Bearer nope"}).status_code == 403
    r = httpx.post(url + "/admin/mixes", json={"name": "x", "mix": "sql"}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and "error" in r.json()
    assert TOKEN not in httpx.get(url + "/metrics").text


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url, _ = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="unknown adapter"):
        client.completions.create(model="mixserve-demo", prompt="hi", max_tokens=4,
                                  extra_body={"mix": {"method": "ties", "children": [{"adapter": "nope"}]}})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="sql", prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="method"):
        client.completions.create(model="mixserve-demo", prompt="hi", max_tokens=4,
                                  extra_body={"mix": {"method": "average", "children": [{"adapter": "sql"}]}})  # fmt: skip
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert generate(url, SQL, "sql")["text"].startswith("SELECT")


def test_client_disconnect_cancels_generation_and_frees_the_kv_blocks(server):
    url, _ = server
    body = {"prompt": SQL, "mix": "sql", "max_tokens": 200, "stream": True, "ignore_eos": True}
    for _ in range(5):
        with httpx.stream("POST", url + "/generate", json=body, timeout=30) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i >= 4:
                    break  # leave mid-stream
    deadline = time.monotonic() + 10
    while (c := httpx.get(url + "/admin/cache", headers=ADMIN).json())["kv_blocks_free"] != c["kv_blocks"]:
        assert time.monotonic() < deadline, "aborted streams still hold KV blocks"
        time.sleep(0.05)
    assert metrics(url).get("mixserve_requests_total{finish_reason=abort}", 0) >= 5


def test_pin_file_is_merged_before_ready_and_admin_is_off_without_a_token(tmp_path):
    pins = tmp_path / "mixes.yaml"
    pins.write_text("code:\n  method: ties\n  density: 0.5\n  children: [{adapter: python}, {adapter: pystr}]\n")
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token=None, max_batch=2, pin_file=pins)
    with running_server(config) as (url, app):
        ready = httpx.get(url + "/ready").json()
        assert ready["ready"] and ready["pins"] == ["code"]
        state = app.state.server
        assert [e.pins for e in state.cache.entries()] == [{"code"}]  # merged before /ready said yes
        assert state.cache.merges_started == 1
        assert generate(url, PY, "code", 8)["mix"] == "code"
        assert state.cache.merges_started == 1
        r = httpx.get(url + "/admin/cache", headers=ADMIN)
        assert r.status_code == 403 and "MIXSERVE_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_streamed_text_is_the_decoding_of_the_streamed_tokens(server):
    url, app = server
    body = {"prompt": JSON, "mix": "json", "max_tokens": 60, "stream": True}
    text, ids = "", []
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                text += event["text"]
                ids += event["token_ids"]
    assert len(ids) > 10
    assert text == app.state.server.runtime.tokenizer.decode(ids, skip_special_tokens=True)
