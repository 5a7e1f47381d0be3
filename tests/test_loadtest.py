"""The load generator against a stub server with known delays: its statistics must recover them."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from loadtest.generator import LoadGenerator, LoadSpec, check_target, zipf_weights
from loadtest.report import percentile, summarize
from tests.server_harness import free_port

TTFT, ITL = 0.08, 0.02  # the stub's delays, seconds


def _stub_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        if body.get("mix") == "broken":
            return StreamingResponse(iter(()), status_code=429)

        async def events():
            await asyncio.sleep(TTFT)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(ITL)
                yield f"data: {json.dumps({'choices': [{'text': 'x', 'index': 0}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_stub_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_latency_statistics_recover_the_stubs_known_delays(stub_url):
    spec = LoadSpec(url=stub_url, rate=None, concurrency=4, duration_s=30, max_requests=16,
                    output_tokens=(5, 5), mixes=["a", "b"])  # fmt: skip
    records, seconds = asyncio.run(LoadGenerator(spec).run())
    s = summarize(records, seconds)
    assert s["completed"] == 16 and s["errors"] == {}
    assert all(r.output_tokens == 5 and len(r.itl) == 4 for r in records)
    # Client-side times are the stub's delays plus HTTP and scheduling overhead (never less than the
    # delays; the upper bounds are loose so that a busy CI machine does not fail the test).
    assert TTFT * 1000 <= s["ttft_p50_ms"] < TTFT * 1000 + 150
    assert ITL * 1000 - 5 <= s["itl_p50_ms"] < ITL * 1000 + 20
    assert ITL * 1000 - 5 <= s["tpot_p50_ms"] < ITL * 1000 + 20
    assert (TTFT + 4 * ITL) * 1000 <= s["e2e_p50_ms"] < (TTFT + 4 * ITL) * 1000 + 250


def test_open_loop_arrivals_are_poisson_and_errors_are_counted_by_type(stub_url):
    spec = LoadSpec(url=stub_url, rate=40.0, duration_s=2.0, max_requests=500, output_tokens=(1, 1),
                    mixes=["a", "broken"], zipf_s=0.0, seed=3)  # fmt: skip
    records, seconds = asyncio.run(LoadGenerator(spec).run())
    # 80 arrivals expected; a Poisson count is within 4 standard deviations (~36) almost surely.
    assert 44 <= len(records) <= 116
    gaps = [b.sent - a.sent for a, b in itertools.pairwise(records)]
    assert 0.6 / 40 < sum(gaps) / len(gaps) < 1.6 / 40  # mean inter-arrival ~ 1/rate
    s = summarize(records, seconds)
    assert s["errors"] == {"http_429": sum(r.mix == "broken" for r in records)} and s["errors"]["http_429"] > 0


def test_zipf_popularity_and_percentiles():
    w = zipf_weights(4, 1.0)
    assert w[0] / w[1] == pytest.approx(2) and w[0] / w[3] == pytest.approx(4) and sum(w) == pytest.approx(1)
    gen = LoadGenerator(LoadSpec(mixes=["m1", "m2", "m3", "m4"], zipf_s=1.0, seed=1))
    counts = Counter(gen._draw()[0] for _ in range(20000))
    assert counts["m1"] / counts["m4"] == pytest.approx(4, rel=0.15)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://192.168.1.1", "http://8.8.8.8"])
def test_refuses_targets_outside_loopback(url):
    with pytest.raises(ValueError, match=r"only 127\.0\.0\.0/8"):
        check_target(url, allow_remote=False)
    check_target("http://127.0.0.1:8000", allow_remote=False)
    check_target("http://localhost:8000", allow_remote=False)
