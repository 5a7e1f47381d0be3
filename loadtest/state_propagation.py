"""How long a pin taken on one replica takes to be served by another, on a shared PostgreSQL (issue 36).

    python -m loadtest.state_propagation --pins 100 --out loadtest/results/state-propagation
    python -m loadtest.state_propagation --state postgresql+psycopg://user@host/db   # an existing database

Starts a throwaway PostgreSQL (Debian's server binaries, as the ``postgres`` user) unless ``--state``
names one, and two ``mixserve serve`` replicas on the demo pointed at it. For each of ``--pins`` mixes:
pin it on replica A, then poll replica B's ``/ready`` every 10 ms until it lists the pin; the delay
counts from A's answer (the store has the pin) to B serving it. Target: p99 <= 2 s. Also reported:
how long A's admin call took (the merge, plus the write).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.postgres import Postgres
from server.readiness import free_port, wait_until_ready


def replica(state: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--port", str(port), "--state", state, "--insecure-admin",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout=300, proc=proc)
    return proc, url


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args) -> dict:
    workdir, pg = None, None
    if args.state is None:
        workdir = Path(tempfile.mkdtemp(prefix="mixserve-pg-"))
        pg = Postgres(workdir)
    state = args.state or pg.url
    procs = []
    try:
        a, url_a = replica(state)
        procs.append(a)
        b, url_b = replica(state)
        procs.append(b)
        delays, admin = [], []
        adapters = ["sql", "json", "python", "pystr"]
        for i in range(args.pins):
            mix = {"method": "linear", "children": [{"adapter": adapters[i % 4], "weight": 1.0},
                                                    {"adapter": adapters[(i + 1) % 4], "weight": 0.5 + i / 1000}]}  # fmt: skip
            t0 = time.perf_counter()
            r = httpx.post(url_a + "/admin/mixes", json={"name": f"prop{i}", "mix": mix}, timeout=120)
            r.raise_for_status()
            t1 = time.perf_counter()
            while f"prop{i}" not in httpx.get(url_b + "/ready", timeout=30).json()["pins"]:
                if time.perf_counter() - t1 > 30:
                    raise RuntimeError(f"prop{i} did not reach the other replica in 30 s")
                time.sleep(0.01)
            delays.append(time.perf_counter() - t1)
            admin.append(t1 - t0)
    finally:
        for p in procs:
            p.terminate()
            p.wait(60)
        if pg is not None:
            pg.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    return {"pins": args.pins, "store": "postgresql (throwaway, 127.0.0.1)" if args.state is None else "given",
            "propagation_s": {"p50": statistics.median(delays), "p99": quantile(delays, 0.99), "max": max(delays)},
            "admin_call_s": {"p50": statistics.median(admin), "p99": quantile(admin, 0.99)},
            "command": " ".join(["python -m loadtest.state_propagation", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def to_markdown(r: dict) -> str:
    p, a = r["propagation_s"], r["admin_call_s"]
    return "\n".join([
        f"# Pin propagation between two replicas on {r['store']}", "",
        f"- {r['pins']} pins taken on replica A, each polled on replica B every 10 ms until served",
        f"- propagation (A answered -> B serves it): p50 {p['p50']:.3f} s, **p99 {p['p99']:.3f} s**, max "
        f"{p['max']:.3f} s (target p99 <= 2 s)",
        f"- A's admin call (merge + store write): p50 {a['p50']:.3f} s, p99 {a['p99']:.3f} s",
        f"- `{r['command']}`; {r['date']}", ""])  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pins", type=int, default=100)
    ap.add_argument("--state", help="an existing database URL (default: a throwaway PostgreSQL)")
    ap.add_argument("--out", help="write <out>.json and <out>.md")
    args = ap.parse_args()
    result = run(args)
    print(to_markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
