"""Waiting for a mixserve (or any HTTP server) to answer 200 on a probe path; standard library only,
for the tools that start servers: benchmarks, load tests, the soak, Ray replicas, tests."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, *, path: str = "/ready", timeout: float = 300.0,
                     proc: subprocess.Popen | None = None) -> None:  # fmt: skip
    """Return once ``url + path`` answers 200; raise if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout:g} s")
