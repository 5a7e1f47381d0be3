"""SIGTERM: /ready goes false and new requests are refused at once, in-flight requests finish, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import free_port

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")


def test_sigterm_drains_in_flight_requests_then_exits_zero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MIXSERVE_ADMIN_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "mixserve.cli", "serve", "--port", str(port), "--max-batch", "4",
                             "--drain-seconds", "60", "--log-level", "warning"], env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "server exited during start-up"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {"prompt": "### task: sql\n### input: count the books per author\n### output:\n", "mix": "sql",
                "max_tokens": 150, "ignore_eos": True, "stream": True}  # fmt: skip
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        if t.is_alive():  # still generating: the server must refuse new work meanwhile
            assert httpx.get(url + "/ready", timeout=5).status_code == 503
            r = httpx.post(url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
            assert r.status_code == 503 and r.headers.get("retry-after")
        t.join(120)
        assert proc.wait(60) == 0
        assert '"finish_reason": "length"' in lines[-1]  # the in-flight request ran to its end
        assert sum(line.count('"token_ids": [') for line in lines) >= 100
    finally:
        if proc.poll() is None:
            proc.kill()
