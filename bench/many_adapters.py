"""Hundreds of adapters: what a server costs as the number of registered adapters grows (issue 34).

For each count ``N`` (``--counts``, default 4,16,64,256) a real ``mixserve serve`` process starts on
``--model`` with ``N`` random rank-``--rank`` adapters in its adapter root, and the bench measures, with
mixes of ``--members`` adapters drawn over all ``N``:

- start-up: seconds from the process start to ``/ready`` (model load, reading ``N`` adapters);
- registration: three more adapters, one at a time, through ``POST /admin/adapters`` (ms, client side,
  median), then one merge over two of them (a process's first merge pays one-off set-up; not counted);
- cold merges through the server (``POST /admin/mixes``, the server's own ``merge_seconds``): mixes over a
  new adapter set, and new mixes (other weights) over a set merged before; the bytes each cached mix takes
  and the path it took;
- decode throughput, closed loop at ``--concurrency`` clients, ``--max-tokens`` tokens per request (eos
  ignored): every request on one mix, and requests spread over ``--mixes`` distinct mixes drawn over all
  ``N`` (merged before timing); rounds taking turns, tokens/s the median of the rounds; the adapter
  pool's loads and evictions over the run.

Ratios are against the same run: N against the smallest N, many mixes against one mix.

    python -m bench.random_model --out /tmp/mistral2 --layers 2
    python -m bench.many_adapters --model /tmp/mistral2 --out bench/results/many-adapters-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.report import write_report
from bench.serve import ScenarioResult, _one_request, pooled, prompts
from merging.basemodel import read_shapes
from merging.synthetic import write_random_adapter
from server.readiness import free_port, wait_until_ready


def write_adapters(root: Path, model: Path, count: int, rank: int) -> list[str]:
    """``count`` random adapters ``a000 ..`` under ``root`` (kept between runs: written once)."""
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shapes = {k.removesuffix(".weight"): v for k, v in read_shapes(model).items()
              if k.removesuffix(".weight").rsplit(".", 1)[-1] in projections}  # fmt: skip
    names = []
    for i in range(count):
        name = f"a{i:03d}"
        if not (root / name / "adapter_model.safetensors").is_file():
            write_random_adapter(root / name, shapes, rank=rank, alpha=2.0 * rank, seed=1000 + i)
        names.append(name)
    return names


def root_of(store: Path, names: list[str], into: Path) -> Path:
    """An adapter root holding ``names`` from ``store`` as hard links (no copy, no symlink to leave the root)."""
    shutil.rmtree(into, ignore_errors=True)
    for name in names:
        (into / name).mkdir(parents=True)
        for f in (store / name).iterdir():
            os.link(f, into / name / f.name)
    return into


def mix(names: list[str], weights: list[float], method: str = "ties") -> dict:
    return {
        "method": method,
        "density": 0.5,
        "children": [{"adapter": n, "weight": w} for n, w in zip(names, weights, strict=True)],
    }


def draws(count: int, members: int, n: int, seed: int) -> list[list[str]]:
    g = torch.Generator().manual_seed(seed)
    return [[f"a{i:03d}" for i in sorted(torch.randperm(count, generator=g)[:members].tolist())] for _ in range(n)]


def warm(client: httpx.Client, url: str, spec: dict) -> dict:
    r = client.post(url + "/admin/mixes", json={"name": "w", "mix": spec, "pin": False}, timeout=600)
    r.raise_for_status()
    return r.json()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def closed_loop(url: str, specs: list, concurrency: int, n: int, max_tokens: int) -> ScenarioResult:
    texts = prompts(n)
    queue = list(range(n))
    timings = []

    async def loop(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop(0)
            timings.append(await _one_request(client, url, texts[i], specs[i % len(specs)], max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return ScenarioResult("mixserve", f"{len(specs)} mixes", concurrency, n, seconds, timings)


def run_count(args, store: Path, count: int, work: Path) -> dict:
    names = [f"a{i:03d}" for i in range(count)]
    root = root_of(store, names, work / f"root{count}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--model", str(args.model), "--adapters", str(root),
           "--port", str(port), "--max-batch", str(max(8, args.concurrency)), "--insecure-admin", "--log-level",
           "warning", "--max-waiting", "4096", *args.server_args.split()]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        wait_until_ready(url, timeout=1800, proc=proc)
        startup = time.perf_counter() - t0
        out: dict = {"adapters": count, "startup_s": startup}
        with httpx.Client(timeout=600) as client:
            # More adapters, registered one at a time while the server runs (median of 3).
            times = []
            for extra in (f"a{count + i:03d}" for i in range(3)):
                (root / extra).mkdir()
                for f in (store / extra).iterdir():
                    os.link(f, root / extra / f.name)
                t = time.perf_counter()
                r = client.post(url + "/admin/adapters", json={"name": extra, "path": extra})
                times.append(time.perf_counter() - t)
                r.raise_for_status()
            out["register_ms"] = 1e3 * statistics.median(times)
            warm(client, url, mix([f"a{count:03d}", f"a{count + 1:03d}"], [1.0, 1.0]))  # the process's first merge
            # Cold merges: new adapter sets, then new weights over sets merged before.
            sets = draws(count, args.members, args.merges, seed=count)
            new = [warm(client, url, mix(s, [1.0] * len(s))) for s in sets]
            known = [warm(client, url, mix(s, [0.5 + 0.1 * k for k in range(len(s))])) for s in sets]
            out["merge_new_set_ms"] = 1e3 * statistics.median(m["merge_seconds"] for m in new)
            out["merge_known_set_ms"] = 1e3 * statistics.median(m["merge_seconds"] for m in known)
            out["paths"] = sorted({m["path"] for m in new + known})
            out["mix_bytes"] = statistics.median(m["bytes"] for m in new + known)
            # Decode throughput: one mix, and many distinct mixes over all N, merged before timing.
            one = [mix(sets[0], [1.0] * len(sets[0]))]
            many = [mix(s, [1.0 - 0.01 * i] * len(s)) for i, s in enumerate(draws(count, args.members, args.mixes,
                                                                                  seed=7 + count))]  # fmt: skip
            for spec in many:
                warm(client, url, spec)
            out["distinct_adapters_in_many"] = len({c["adapter"] for spec in many for c in spec["children"]})
        n = args.requests or max(8, 2 * args.concurrency)
        loads0, evictions0 = metric(url, "mixserve_adapter_pool_loads_total"), metric(url,
                                                                                       "mixserve_adapter_pool_evictions_total")  # fmt: skip
        asyncio.run(closed_loop(url, one, args.concurrency, args.concurrency, 4))  # warm-up
        runs: dict[str, list[ScenarioResult]] = {"one": [], "many": []}
        for _ in range(args.rounds):
            for label, specs in (("one", one), ("many", many)):
                runs[label].append(asyncio.run(closed_loop(url, specs, args.concurrency, n, args.max_tokens)))
        for label in runs:
            out[f"{label}_tokens_per_s"] = pooled(runs[label]).summary()["tokens_per_s"]
        out["many_vs_one"] = out["many_tokens_per_s"] / out["one_tokens_per_s"]
        # What the bytes allow: a step reads the weights and its rows' distinct adapters (at most c x members).
        weights = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
        per_adapter = (store / "a000" / "adapter_model.safetensors").stat().st_size
        per_step = min(out["distinct_adapters_in_many"], args.concurrency * args.members)
        out["bytes_allow"] = (weights + args.members * per_adapter) / (weights + per_step * per_adapter)
        out["pool_loads"] = metric(url, "mixserve_adapter_pool_loads_total") - loads0
        out["pool_evictions"] = metric(url, "mixserve_adapter_pool_evictions_total") - evictions0
        out["pool_slots"] = metric(url, "mixserve_adapter_pool_slots")
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    first = rows[0]
    lines = [
        f"# Hundreds of adapters ({result['machine']})",
        "",
        f"Model `{Path(result['model']).name}` ({result['layers']} layers, hidden {result['hidden']}, fp32); N random "
        f"rank-{result['rank']} adapters in the root at start; mixes of {result['members']} adapters (TIES) drawn "
        f"over all N; merges: median of {result['merges']} through `POST /admin/mixes` (the server's "
        f"`merge_seconds`); throughput: closed loop at c={result['concurrency']}, {result['max_tokens']} tokens "
        f"per request, median of {result['rounds']} rounds, one mix vs {result['mixes']} distinct mixes; 'what the "
        "bytes allow': many / one if a step were bound by the bytes it reads (the weights and at most c x members "
        "distinct adapters). "
        f"Command: `{result['command']}`.",
        "",
        "| registered adapters N | start-up s | vs N=" + str(first["adapters"]) + " | register one more ms | "
        "path | cold merge, new set ms | cold merge, known set ms | bytes per cached mix | one mix tok/s | "
        f"{result['mixes']} mixes tok/s | many / one | what the bytes allow | distinct adapters in the many | "
        "pool loads / evictions (slots) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapters']} | {r['startup_s']:.1f} | {r['startup_s'] / first['startup_s']:.2f}x | "
            f"{r['register_ms']:.0f} | {', '.join(r['paths'])} | {r['merge_new_set_ms']:.1f} | "
            f"{r['merge_known_set_ms']:.1f} | {r['mix_bytes'] / 1e6:.3f} MB | {r['one_tokens_per_s']:.1f} | "
            f"{r['many_tokens_per_s']:.1f} | {r['many_vs_one']:.2f} | {r['bytes_allow']:.2f} | "
            f"{r['distinct_adapters_in_many']} | "
            f"{r['pool_loads']:.0f} / {r['pool_evictions']:.0f} ({r['pool_slots']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF model directory (e.g. bench.random_model's)")
    ap.add_argument("--counts", default="4,16,64,256", help="registered adapter counts (default 4,16,64,256)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--members", type=int, default=3, help="adapters per mix (default 3)")
    ap.add_argument("--merges", type=int, default=5, help="cold merges of each kind per N (default 5)")
    ap.add_argument("--mixes", type=int, default=16, help="distinct mixes in the many-mix load (default 16)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=0, help="requests per round (default: max(8, 2 x c))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--store", type=Path, default=None, help="where the random adapters are written (kept)")
    ap.add_argument("--server-args", dest="server_args", default="", help="extra `mixserve serve` flags")
    ap.add_argument("--out", default="bench/results/many-adapters-cpu")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    store = args.store or Path(tempfile.gettempdir()) / f"mixserve-adapters-{Path(args.model).name}-r{args.rank}"
    print(f"writing up to {max(counts) + 3} adapters under {store}", flush=True)
    write_adapters(store, args.model, max(counts) + 3, args.rank)
    result = {"model": str(args.model), "layers": config.num_hidden_layers, "hidden": config.hidden_size,
              "rank": args.rank, "members": args.members, "merges": args.merges, "mixes": args.mixes,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "command": "python -m bench.many_adapters " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} threads, torch "
                         f"{torch.__version__}", "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for count in counts:
            print(f"N = {count} ...", flush=True)
            result["rows"].append(run_count(args, store, count, Path(work)))
            print(result["rows"][-1], flush=True)
            write_report(args.out, result, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
