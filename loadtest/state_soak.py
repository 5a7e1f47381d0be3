"""Crash soak of the admin state store: SIGKILL a loaded server in the middle of admin writes, restart it,
check that nothing acknowledged was lost (issue 36).

Each cycle starts ``mixserve serve --state FILE`` on the demo (127.0.0.1, a copy of its adapters), checks
its state against every write acknowledged so far, then runs generation load (4 concurrent streams)
while an admin client writes at random (pin a new name, re-pin one, unpin one, register an adapter under
a new name; every 10th cycle a tiny tune job), and kills the server with SIGKILL at a random moment
(0.2-2.5 s in). Pass: after every restart each acknowledged write is there (a pin with its mix, an
unpin's name gone, a registration, a finished tune job's result), and each write in flight at the kill
is either wholly there or wholly absent.

    python -m loadtest.state_soak --cycles 100 --out loadtest/results/state-soak      # the committed run
    python -m loadtest.state_soak --cycles 3                                          # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.config import DEMO_DIR
from server.readiness import free_port, wait_until_ready

SQL = ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
       "how many books have author bemi\n### output:\n")  # fmt: skip
ADAPTERS = ("sql", "json", "python", "pystr")
MAX_PINS, MAX_ADAPTERS = 40, 30  # the state stays this size: restarts stay comparable over the cycles


class Expected:
    """What the store must hold: acknowledged writes, and the writes in flight at a kill (either way)."""

    def __init__(self) -> None:
        self.pins: dict[str, dict] = {}
        self.adapters: dict[str, str] = {}  # registered name -> the root directory it was read from
        self.tune_jobs: set[str] = set()
        self.pending: list[tuple[str, str, dict | None]] = []  # (kind, name, mix) sent, not acknowledged

    def check(self, fingerprints: dict[str, str], mixes: dict, jobs: set[str]) -> tuple[list[str], dict[str, int]]:
        """Lost acknowledged writes, and how the pending ones came out (``after`` / ``before``).
        ``fingerprints``: every served adapter's; a registered name must serve its directory's."""
        served = {p["name"]: p["mix"] for p in mixes["pins"]}
        # A name with a write in flight at the kill is checked below: before or after, either will do.
        busy = {(kind == "adapter", name) for kind, name, _ in self.pending}
        lost = [f"pin {n}" for n, mix in self.pins.items() if (False, n) not in busy and served.get(n) != mix]
        lost += [f"adapter {a}" for a, d in self.adapters.items()
                 if (True, a) not in busy and fingerprints.get(a) != fingerprints[d]]  # fmt: skip
        lost += [f"tune job {j}" for j in self.tune_jobs if j not in jobs]
        outcome = {"after": 0, "before": 0}
        for kind, name, mix in self.pending:
            if kind == "pin":
                took = served.get(name) == mix
                if not took and name in self.pins and served.get(name) != self.pins[name]:
                    lost.append(f"pin {name}: neither before nor after ({served.get(name)})")
                if took:
                    self.pins[name] = mix
            elif kind == "unpin":
                took = name not in served
                if not took and served.get(name) != self.pins.get(name):
                    lost.append(f"pin {name}: neither before nor after the unpin ({served.get(name)})")
                if took:
                    self.pins.pop(name, None)
            else:
                took = fingerprints.get(name) == fingerprints[mix]
                before = self.adapters.get(name)
                if not took and fingerprints.get(name) != (fingerprints[before] if before else None):
                    lost.append(f"adapter {name}: neither before nor after the registration")
                if took:
                    self.adapters[name] = mix
            outcome["after" if took else "before"] += 1
        self.pending = []
        return lost, outcome


def random_mix(rng: random.Random) -> dict:
    picks = rng.sample(ADAPTERS, rng.randint(2, 3))
    method = rng.choice(["linear", "ties", "task_arithmetic"])
    node = {"method": method, "space": "lowrank", "children": [{"adapter": a, "weight": round(rng.uniform(0.5, 1.5), 2)}
                                                               for a in picks]}  # fmt: skip
    if method == "ties":
        node["density"] = 0.5
    return node


async def admin_writes(client: httpx.AsyncClient, url: str, rng: random.Random, expected: Expected, cycle: int,
                       counts: dict[str, int]) -> None:  # fmt: skip
    """Random admin writes until cancelled (the kill); each recorded pending before it is sent."""
    i = 0
    while True:
        i += 1
        roll = rng.random()
        if len(expected.pins) >= MAX_PINS and roll < 0.65:
            roll = 0.7  # bounded: past MAX_PINS a pin write becomes an unpin
        if roll < 0.45 or not expected.pins:
            name, mix = f"p{cycle}-{i}", random_mix(rng)
            kind, req = "pin", client.post(url + "/admin/mixes", json={"name": name, "mix": mix})
        elif roll < 0.65:
            name = rng.choice(sorted(expected.pins))
            mix = random_mix(rng)
            kind, req = "pin", client.post(url + "/admin/mixes", json={"name": name, "mix": mix})
        elif roll < 0.85:
            name, mix = rng.choice(sorted(expected.pins)), None
            kind, req = "unpin", client.delete(url + f"/admin/mixes/{name}")
        else:  # a new name, or past MAX_ADAPTERS an earlier one replaced by another directory
            new = len(expected.adapters) < MAX_ADAPTERS
            name = f"a{cycle}-{i}" if new else rng.choice(sorted(expected.adapters))
            mix = rng.choice([a for a in ADAPTERS if a != expected.adapters.get(name)])  # here: the directory
            body = {"name": name, "path": mix, "replace": not new}
            kind, req = "adapter", client.post(url + "/admin/adapters", json=body)
        entry = (kind, name, mix)
        expected.pending.append(entry)
        r = await req
        if r.status_code != 200:
            raise RuntimeError(f"{kind} {name}: {r.status_code} {r.text}")
        expected.pending.remove(entry)
        if kind == "pin":
            expected.pins[name] = mix
        elif kind == "unpin":
            expected.pins.pop(name, None)
        else:
            expected.adapters[name] = mix
        counts[kind] += 1


async def load(client: httpx.AsyncClient, url: str, stats: dict[str, int]) -> None:
    while True:
        try:
            r = await client.post(url + "/v1/completions", json={"model": "sql", "prompt": SQL, "max_tokens": 16,
                                                                 "temperature": 0})  # fmt: skip
            stats["ok" if r.status_code == 200 else f"http {r.status_code}"] += 1
        except httpx.TransportError:
            stats["cut by the kill"] += 1
            return


async def tune_job(client: httpx.AsyncClient, url: str) -> str:
    body = {"tasks": ["sql", "json"], "budget": 1, "n_val": 2, "seed": 1}
    job = (await client.post(url + "/admin/mixes/tune", json=body)).json()
    while True:
        view = (await client.get(url + f"/admin/mixes/tune/{job['id']}")).json()
        if view["status"] != "running":
            return job["id"]
        await asyncio.sleep(0.2)


async def cycle(url: str, rng: random.Random, expected: Expected, n: int, counts: dict, stats: dict) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        if n % 10 == 0:
            expected.tune_jobs.add(await tune_job(client, url))
            counts["tune"] += 1
        tasks = [asyncio.create_task(load(client, url, stats)) for _ in range(4)]
        tasks.append(asyncio.create_task(admin_writes(client, url, rng, expected, n, counts)))
        await asyncio.sleep(rng.uniform(0.2, 2.5))
        if tasks[-1].done() and tasks[-1].exception() is not None:  # an admin write refused: a bug, not a kill
            counts["refused"] = counts.get("refused", 0) + 1
            print(f"admin write refused: {tasks[-1].exception()}", file=sys.stderr)
        return tasks


def run(args) -> dict:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mixserve-state-soak-"))
    adapters = work / "adapters"
    shutil.copytree(DEMO_DIR / "adapters", adapters)
    state = work / "state.db"
    expected, lost_all = Expected(), []
    counts = {"pin": 0, "unpin": 0, "adapter": 0, "tune": 0}
    stats: dict[str, int] = {"ok": 0, "cut by the kill": 0}
    outcomes = {"after": 0, "before": 0}
    starts, restored = [], []
    try:
        for n in range(args.cycles + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--port", str(port), "--adapters", str(adapters),
                   "--state", str(state), "--insecure-admin", "--max-batch", "8", "--log-level", "warning"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
            try:
                wait_until_ready(url, timeout=300, proc=proc)
                starts.append(time.perf_counter() - t0)
                ready = httpx.get(url + "/ready", timeout=30).json()
                mixes = httpx.get(url + "/admin/mixes", timeout=30).json()
                jobs = {j["id"] for j in httpx.get(url + "/admin/mixes/tune", timeout=30).json()["jobs"]}
                served = httpx.get(url + "/admin/adapters", timeout=30).json()["adapters"]
                lost, outcome = expected.check({a["name"]: a["fingerprint"] for a in served}, mixes, jobs)
                lost_all += [f"cycle {n}: {x}" for x in lost]
                for x in lost:
                    print(f"LOST in cycle {n}: {x}", file=sys.stderr, flush=True)
                for k in outcome:
                    outcomes[k] += outcome[k]
                restored.append(len(mixes["pins"]))
                print(f"cycle {n}: up in {starts[-1]:.1f} s, {len(mixes['pins'])} pins, {len(ready['adapters'])} "
                      f"adapters, {len(jobs)} tune results; lost {len(lost)}; in flight at the kill {outcome}",
                      file=sys.stderr, flush=True)  # fmt: skip
                if n == args.cycles:
                    break

                async def one(url: str = url, n: int = n, proc: subprocess.Popen = proc) -> None:
                    tasks = await cycle(url, rng, expected, n, counts, stats)
                    proc.send_signal(signal.SIGKILL)  # mid-write, mid-generation
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

                asyncio.run(one())
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"cycles": args.cycles, "seed": args.seed, "acknowledged_writes": counts, "lost": lost_all,
            "in_flight_at_kill": outcomes, "generation": stats, "pins_at_end": restored[-1] if restored else 0,
            "restart_seconds": {"p50": statistics.median(starts), "max": max(starts)},
            "command": " ".join(["python -m loadtest.state_soak", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def to_markdown(r: dict) -> str:
    w = r["acknowledged_writes"]
    return "\n".join([
        f"# State store crash soak: {r['cycles']} SIGKILL-and-restart cycles under load", "",
        f"- acknowledged writes: {w['pin']} pins, {w['unpin']} unpins, {w['adapter']} registrations, "
        f"{w['tune']} tune jobs; **lost: {len(r['lost'])}**",
        f"- writes in flight at a kill: {r['in_flight_at_kill']['after']} there after the restart, "
        f"{r['in_flight_at_kill']['before']} absent (never half)",
        f"- generation during the cycles: {r['generation']}",
        f"- restart to ready: median {r['restart_seconds']['p50']:.1f} s, max {r['restart_seconds']['max']:.1f} s; "
        f"{r['pins_at_end']} pins restored at the end",
        f"- `{r['command']}`; seed {r['seed']}; {r['date']}", ""] + [f"- LOST: {x}" for x in r["lost"]])  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write <out>.json and <out>.md")
    args = ap.parse_args()
    result = run(args)
    markdown = to_markdown(result)
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown)
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
