"""Open-loop load generator for mixserve's HTTP API (or any OpenAI-compatible completions server).

Arrivals are Poisson at ``rate`` requests/s (open loop: a slow server does not slow the arrivals,
so queueing shows up in the latencies) or a fixed ``concurrency`` (closed loop). Each request picks
a mix by Zipf popularity over ``mixes``, a prompt length and an output length from uniform ranges,
and streams, so time to first token and every inter-token gap are measured on the client.

Bounded by ``max_requests`` and ``duration_s``; the target must be a loopback address unless
``allow_remote`` is set (for a real deployment you own).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

WORDS = ("alpha", "beta", "gamma", "delta", "table", "select", "json", "value", "count", "list", "name", "city")


@dataclass
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    rate: float | None = 4.0  # requests/s (Poisson); None = closed loop at `concurrency`
    concurrency: int = 8
    duration_s: float = 30.0
    max_requests: int = 1000
    mixes: list = field(default_factory=lambda: [None])  # names, MixSpec dicts, or None (the base model)
    zipf_s: float = 1.1  # popularity exponent: mix k (1-based) is drawn with weight 1 / k^s
    prompt_words: tuple[int, int] = (8, 48)
    output_tokens: tuple[int, int] = (16, 64)
    model: str = "mixserve-demo"
    endpoint: str = "/v1/completions"  # or "/generate"
    prompts: list[str] | None = None  # fixed prompts instead of generated words
    timeout_s: float = 120.0
    seed: int = 0
    allow_remote: bool = False


@dataclass
class RequestRecord:
    mix: str
    sent: float  # seconds since the run started
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None  # "http_429", "http_500", "timeout", "connect", "stream", ...

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT)."""
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse any host that does not resolve to loopback only, unless ``allow_remote``."""
    if allow_remote:
        return
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    outside = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if outside:
        raise ValueError(
            f"refusing to load {host} ({', '.join(sorted(outside))}): only 127.0.0.0/8 and ::1 are allowed "
            "without --allow-remote"
        )


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def mix_label(mix) -> str:
    if mix is None:
        return "base"
    return mix if isinstance(mix, str) else "adhoc:" + json.dumps(mix, sort_keys=True)[:40]


class LoadGenerator:
    def __init__(self, spec: LoadSpec) -> None:
        check_target(spec.url, spec.allow_remote)
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self._weights = zipf_weights(len(spec.mixes), spec.zipf_s)

    def _draw(self) -> tuple[object, str, int]:
        spec, rng = self.spec, self._rng
        mix = rng.choices(spec.mixes, weights=self._weights)[0]
        if spec.prompts:
            prompt = rng.choice(spec.prompts)
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*spec.prompt_words)))
        return mix, prompt, rng.randint(*spec.output_tokens)

    def _body(self, mix, prompt: str, max_tokens: int) -> dict:
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
        if self.spec.endpoint.startswith("/v1/"):
            body["model"] = self.spec.model
        if mix is not None:
            body["mix"] = mix
        return body

    async def _one(self, client: httpx.AsyncClient, t0: float, mix, prompt: str, max_tokens: int) -> RequestRecord:
        rec = RequestRecord(mix_label(mix), time.perf_counter() - t0)
        start = time.perf_counter()
        last = None
        try:
            async with client.stream(
                "POST", self.spec.url + self.spec.endpoint, json=self._body(mix, prompt, max_tokens)
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    rec.error = f"http_{r.status_code}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("error"):
                        rec.error = "stream"
                        return rec
                    text = event["choices"][0]["text"] if "choices" in event else event.get("text", "")
                    n = len(event["token_ids"]) if "token_ids" in event else (1 if text else 0)
                    if not n:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    rec.output_tokens += n
            rec.e2e = time.perf_counter() - start
        except httpx.TimeoutException:
            rec.error = "timeout"
        except httpx.ConnectError:
            rec.error = "connect"
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            rec.error = "protocol"
        return rec

    async def run(self) -> tuple[list[RequestRecord], float]:
        """Send the load; returns the records and the run's wall time (until the last response)."""
        spec = self.spec
        limits = httpx.Limits(max_connections=max(spec.concurrency, 64) * 4, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=spec.timeout_s, limits=limits) as client:
            t0 = time.perf_counter()
            deadline = t0 + spec.duration_s
            if spec.rate is None:
                records = await self._closed_loop(client, t0, deadline)
            else:
                records = await self._open_loop(client, t0, deadline)
            return records, time.perf_counter() - t0

    async def _open_loop(self, client, t0: float, deadline: float) -> list[RequestRecord]:
        tasks = []
        next_at = t0
        for _ in range(self.spec.max_requests):
            next_at += self._rng.expovariate(self.spec.rate)
            if next_at > deadline:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(self._one(client, t0, *self._draw())))
        return list(await asyncio.gather(*tasks))

    async def _closed_loop(self, client, t0: float, deadline: float) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        budget = [self.spec.max_requests]

        async def worker() -> None:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                records.append(await self._one(client, t0, *self._draw()))

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))
        return records
