"""Soak test with fault injection: mixed load for a bounded time against a real ``mixserve serve``
process on 127.0.0.1, every completed greedy response checked against its reference output.

Load: clients send (prompt, mix) pairs drawn from a fixed set — adapters, a pinned mix, ad-hoc
mixes — streaming and not, through ``/generate`` and ``/v1/completions``. References are computed
first, one request at a time (batch 1). Faults, injected all along:

- malformed requests (bad JSON, wrong types, unknown adapters and methods, oversized bodies);
- client disconnects in the middle of a stream;
- admin churn: pin and unpin throw-away mixes (with a small cache budget this forces evictions);
- cache pressure: ad-hoc mixes never seen before (a merge each);
- a bad adapter registered mid-run (a truncated safetensors file in the adapter root).

Pass criteria: no 5xx, no wrong output, no accepted request lost; afterwards every KV block free,
the cache within its budget, and the server's RSS back near its warmed-up baseline.

    python -m loadtest.soak --seconds 600 --out loadtest/results/soak      # the committed run
    python -m loadtest.soak --seconds 20                                     # the short CI mode
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from server.config import DEMO_DIR
from server.readiness import free_port, wait_until_ready

TOKEN = "soak-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [
    "### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; how many books have author bemi\n### output:\n",
    "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n",
    "### task: python\n### input: write sum_even(xs) that returns the sum of the numbers in xs that are even\n### output:\n",
    "### task: pystr\n### input: write upper(s) that returns s in upper case\n### output:\n",
]
MIXES: list = [
    None,
    "sql",
    "json",
    "code",  # pinned at start-up
    {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]},
    {"method": "linear", "children": [{"adapter": "python", "weight": 0.7}, {"adapter": "pystr", "weight": 0.5}]},
    {"method": "dare_ties", "drop_rate": 0.3, "seed": 3, "children": [{"adapter": "sql"}, {"adapter": "pystr"}]},
]
PIN_FILE = "code:\n  method: ties\n  density: 0.5\n  children: [{adapter: python}, {adapter: pystr}]\n"


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Soak:
    def __init__(self, seconds: float, clients: int, max_tokens: int, seed: int, workdir: Path) -> None:
        self.seconds, self.clients, self.max_tokens = seconds, clients, max_tokens
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.counts: Counter = Counter()  # requests by kind
        self.faults: Counter = Counter()  # faults injected by type
        self.errors: Counter = Counter()  # unexpected outcomes by type (must stay empty)
        self.expected_4xx: Counter = Counter()
        self.reference: dict[tuple[int, int], str] = {}

    # ------------------------------------------------------------------------------------ server
    def start_server(self) -> None:
        root = self.workdir / "adapters"
        shutil.copytree(DEMO_DIR / "adapters", root)
        (self.workdir / "pins.yaml").write_text(PIN_FILE)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--port", str(self.port), "--adapters", str(root),
               "--pin-file", str(self.workdir / "pins.yaml"), "--max-batch", "8", "--max-waiting", "512",
               "--cache-mb", "8", "--max-tokens", "64", "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env={**os.environ, "MIXSERVE_ADMIN_TOKEN": TOKEN})
        wait_until_ready(self.url, proc=self.proc)

    def stop_server(self) -> int:
        self.proc.terminate()
        return self.proc.wait(120)

    # --------------------------------------------------------------------------------- requests
    def _body(self, p: int, m: int, stream: bool) -> dict:
        body = {"prompt": PROMPTS[p], "max_tokens": self.max_tokens, "stream": stream}
        if MIXES[m] is not None:
            body["mix"] = MIXES[m]
        return body

    async def _generate(self, client: httpx.AsyncClient, p: int, m: int, stream: bool) -> str | None:
        """The text of one greedy /generate request; None if it was refused (recorded)."""
        if not stream:
            r = await client.post(self.url + "/generate", json=self._body(p, m, False))
            if r.status_code != 200:
                self._unexpected(r.status_code, "generate")
                return None
            return r.json()["text"]
        parts, finished = [], False
        async with client.stream("POST", self.url + "/generate", json=self._body(p, m, True)) as r:
            if r.status_code != 200:
                self._unexpected(r.status_code, "generate-stream")
                return None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    parts.append(event["text"])
                    finished = finished or event["finish_reason"] is not None
        if not finished:
            self.errors["lost: stream ended without a finish event"] += 1
            return None
        return "".join(parts)

    async def _completion(self, client: httpx.AsyncClient, p: int, m: int) -> str | None:
        body = {"model": "mixserve-demo", "prompt": PROMPTS[p], "max_tokens": self.max_tokens, "temperature": 0}
        if MIXES[m] is not None:
            body["mix"] = MIXES[m]
        r = await client.post(self.url + "/v1/completions", json=body)
        if r.status_code != 200:
            self._unexpected(r.status_code, "completions")
            return None
        return r.json()["choices"][0]["text"]

    def _unexpected(self, status: int, where: str) -> None:
        self.errors[f"{where}: HTTP {status}"] += 1

    async def compute_references(self, client: httpx.AsyncClient) -> None:
        for p in range(len(PROMPTS)):
            for m in range(len(MIXES)):
                text = await self._generate(client, p, m, stream=False)
                if text is None:
                    raise RuntimeError(f"reference request failed: {self.errors}")
                self.reference[(p, m)] = text

    async def client_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            p, m = self.rng.randrange(len(PROMPTS)), self.rng.randrange(len(MIXES))
            kind = self.rng.choice(["generate", "generate-stream", "completions"])
            self.counts[kind] += 1
            if kind == "completions":
                text = await self._completion(client, p, m)
            else:
                text = await self._generate(client, p, m, stream=kind == "generate-stream")
            if text is not None and text != self.reference[(p, m)]:
                self.errors["wrong output"] += 1

    # ----------------------------------------------------------------------------------- faults
    async def fault_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        faults = [self._malformed, self._disconnect, self._pin_churn, self._cold_mix]
        bad_adapter_at = time.monotonic() + (deadline - time.monotonic()) / 2
        while time.monotonic() < deadline:
            if bad_adapter_at and time.monotonic() >= bad_adapter_at:
                await self._bad_adapter(client)
                bad_adapter_at = 0.0
            await self.rng.choice(faults)(client)
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))

    async def _expect_4xx(self, r: httpx.Response, label: str) -> None:
        if 400 <= r.status_code < 500 and r.json().get("error", {}).get("message"):
            self.expected_4xx[r.status_code] += 1
        else:
            self.errors[f"{label}: HTTP {r.status_code}"] += 1

    async def _malformed(self, client: httpx.AsyncClient) -> None:
        case = self.rng.randrange(5)
        self.faults[f"malformed/{['bad_json', 'wrong_type', 'unknown_adapter', 'bad_method', 'oversize'][case]}"] += 1
        url = self.url + "/v1/completions"
        if case == 0:
            r = await client.post(
                url, content=b'{"model": "sql", "prompt": ', headers={"content-type": "application/json"}
            )
        elif case == 1:
            r = await client.post(url, json={"model": "sql", "prompt": "hi", "max_tokens": "lots"})
        elif case == 2:
            r = await client.post(
                url,
                json={"model": "sql", "prompt": "hi", "mix": {"method": "ties", "children": [{"adapter": "ghost"}]}},
            )
        elif case == 3:
            r = await client.post(
                url, json={"model": "sql", "prompt": "hi", "mix": {"method": "mean", "children": [{"adapter": "sql"}]}}
            )
        else:
            r = await client.post(url, json={"model": "sql", "prompt": "x" * (2 << 20)})
        await self._expect_4xx(r, "malformed")

    async def _disconnect(self, client: httpx.AsyncClient) -> None:
        self.faults["disconnect mid-stream"] += 1
        body = {**self._body(self.rng.randrange(len(PROMPTS)), self.rng.randrange(len(MIXES)), True),
                "max_tokens": 64, "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", self.url + "/generate", json=body) as r:
            n = 0
            async for _line in r.aiter_lines():
                n += 1
                if n >= 3:
                    break  # leaving the context closes the connection mid-stream

    async def _pin_churn(self, client: httpx.AsyncClient) -> None:
        name = f"churn{self.rng.randrange(4)}"
        if self.rng.random() < 0.6:
            self.faults["admin pin"] += 1
            mix = {"method": "dare_linear", "drop_rate": 0.4, "seed": self.rng.randrange(10**6),
                   "children": [{"adapter": "json"}, {"adapter": "pystr"}]}  # fmt: skip
            r = await client.post(self.url + "/admin/mixes", json={"name": name, "mix": mix}, headers=ADMIN)
            if r.status_code != 200:
                self.errors[f"pin: HTTP {r.status_code}"] += 1
        else:
            self.faults["admin unpin"] += 1
            r = await client.delete(self.url + f"/admin/mixes/{name}", headers=ADMIN)
            if r.status_code not in (200, 404):
                self.errors[f"unpin: HTTP {r.status_code}"] += 1

    async def _cold_mix(self, client: httpx.AsyncClient) -> None:
        self.faults["cold ad-hoc mix"] += 1
        mix = {"method": "dare_ties", "drop_rate": 0.5, "seed": self.rng.randrange(10**9),
               "children": [{"adapter": "sql"}, {"adapter": "python"}]}  # fmt: skip
        r = await client.post(self.url + "/generate", json={"prompt": PROMPTS[0], "mix": mix, "max_tokens": 4})
        if r.status_code != 200:
            self.errors[f"cold mix: HTTP {r.status_code}"] += 1

    async def _bad_adapter(self, client: httpx.AsyncClient) -> None:
        self.faults["bad adapter registered"] += 1
        root = self.workdir / "adapters"
        bad = root / "broken"
        shutil.copytree(root / "sql", bad)
        blob = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 3])
        r = await client.post(self.url + "/admin/adapters", json={"name": "broken", "path": "broken"}, headers=ADMIN)
        await self._expect_4xx(r, "bad adapter")

    # -------------------------------------------------------------------------------------- run
    async def run_load(self) -> dict:
        limits = httpx.Limits(max_connections=self.clients + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await self.compute_references(client)
            await asyncio.sleep(0.5)
            rss_before = _rss_bytes(self.proc.pid)
            deadline = time.monotonic() + self.seconds
            await asyncio.gather(*(self.client_loop(client, deadline) for _ in range(self.clients)),
                                 self.fault_loop(client, deadline))  # fmt: skip
            # Let aborted streams be noticed and drop churn pins, then measure.
            for i in range(4):
                await client.delete(self.url + f"/admin/mixes/churn{i}", headers=ADMIN)
            await asyncio.sleep(2)
            cache = (await client.get(self.url + "/admin/cache", headers=ADMIN)).json()
            rss_after = _rss_bytes(self.proc.pid)
        return {"rss_before": rss_before, "rss_after": rss_after, "cache": cache}


def run(seconds: float, clients: int = 6, max_tokens: int = 24, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="mixserve-soak-") as tmp:
        soak = Soak(seconds, clients, max_tokens, seed, Path(tmp))
        soak.start_server()
        try:
            t0 = time.monotonic()
            memory = asyncio.run(soak.run_load())
            wall = time.monotonic() - t0
        finally:
            exit_code = soak.stop_server()
    cache = memory["cache"]
    report = {
        "seconds": seconds, "wall_seconds": round(wall, 1), "clients": clients,
        "requests": dict(soak.counts), "requests_total": sum(soak.counts.values()),
        "faults": dict(soak.faults), "faults_total": sum(soak.faults.values()),
        "expected_4xx": {str(k): v for k, v in soak.expected_4xx.items()},
        "errors": dict(soak.errors), "wrong_outputs": soak.errors.get("wrong output", 0),
        "rss_before_mb": round(memory["rss_before"] / 2**20, 1), "rss_after_mb": round(memory["rss_after"] / 2**20, 1),
        "kv_blocks_free_after": cache["kv_blocks_free"], "kv_blocks": cache["kv_blocks"],
        "cache_bytes_after": cache["bytes"],
        "cache_budget_bytes": cache["budget_bytes"], "cache_entries_after": len(cache["entries"]),
        "leases_after": sum(e["leases"] for e in cache["entries"]), "server_exit_code": exit_code,
    }  # fmt: skip
    return report


def to_markdown(r: dict) -> str:
    lines = [f"Soak: {r['seconds']:g} s of load ({r['wall_seconds']} s with references), {r['clients']} clients.", "",
             "| what | value |", "|---|---|"]  # fmt: skip
    for key in ("requests_total", "faults_total", "wrong_outputs", "rss_before_mb", "rss_after_mb",
                "kv_blocks_free_after", "kv_blocks", "cache_bytes_after", "cache_budget_bytes", "leases_after", "server_exit_code"):  # fmt: skip
        lines.append(f"| {key} | {r[key]} |")
    for title, key in (("requests by kind", "requests"), ("faults injected", "faults"),
                       ("expected 4xx by status", "expected_4xx"), ("errors (must be empty)", "errors")):  # fmt: skip
        lines += ["", f"**{title}**: " + (", ".join(f"{k}: {v}" for k, v in sorted(r[key].items())) or "none")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    report = run(args.seconds, args.clients, args.max_tokens, args.seed)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    ok = not report["errors"] and report["kv_blocks_free_after"] == report["kv_blocks"] and report["leases_after"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
