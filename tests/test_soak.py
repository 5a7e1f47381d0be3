"""The soak test's short mode: 20 s of mixed load with injected faults against a real server process."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained"),
]


def test_short_soak_loses_nothing_and_returns_memory():
    from loadtest.soak import run

    r = run(seconds=20, clients=4, max_tokens=16)
    assert r["errors"] == {}, r
    assert r["wrong_outputs"] == 0 and r["requests_total"] > 20
    assert r["faults_total"] > 10 and r["faults"].get("bad adapter registered") == 1
    assert r["faults"].get("disconnect mid-stream", 0) >= 1 and r["faults"].get("admin pin", 0) >= 1
    assert r["kv_blocks_free_after"] == r["kv_blocks"] and r["leases_after"] == 0
    assert r["cache_bytes_after"] <= r["cache_budget_bytes"]
    assert r["rss_after_mb"] <= r["rss_before_mb"] * 1.25 + 64, r
    assert r["server_exit_code"] == 0
