"""A real mixserve (uvicorn on 127.0.0.1, an ephemeral port) in a background thread, for integration tests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import torch
import uvicorn

from server.config import ServeConfig
from server.entrypoints.api import create_app
from server.readiness import free_port


@contextmanager
def running_server(config: ServeConfig, ready_timeout: float = 120.0, extensions=None):
    """Yield the base URL once ``/ready`` is true; stop the server (and its lifespan) afterwards. The app is
    `mixserve serve`'s: with the tune jobs mounted unless ``extensions`` says otherwise."""
    config.host, config.port = "127.0.0.1", free_port()
    threads = torch.get_num_threads()  # the server sets torch's (process-wide) CPU threads; tests get theirs back
    if extensions is None:
        from mixserve.tune_jobs import TuneService

        extensions = [TuneService()]
    app = create_app(config, extensions)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                r = httpx.get(url + "/ready", timeout=2)
                if r.status_code == 200:
                    break
                if r.json().get("reason", "") not in ("loading", "shutting down"):
                    raise RuntimeError(f"server failed to start: {r.json()}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mixserve did not become ready")
            time.sleep(0.1)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        torch.set_num_threads(threads)
