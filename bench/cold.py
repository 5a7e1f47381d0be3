"""Cold mixes through a running server: what a mix never seen before costs before its first token.

Starts ``mixserve serve`` (its own process, an adapter root copied from ``--adapters``) and measures,
over HTTP:

- start-up: seconds to ready (model load, reading the adapters);
- registration: ``POST /admin/adapters`` of one more adapter (a random one of the same shapes)
  while the server runs: reading it;
- cold merges: ``POST /admin/mixes`` (``pin: false``) of mixes never merged before, the server's
  ``merge_seconds`` and serving path, for the first mix over a 3-adapter set (its bases are computed)
  and for ``--mixes`` more over the same set (other weights and knobs: the bases are cached);
- time to first token of ``/generate`` with ``max_tokens: 1`` for a cold mix and then for the same
  mix again (a cache hit), taking turns.

The server is the ``mixserve`` of the working directory (``python -m mixserve.cli``): to compare with
the code before a change, run this file from that checkout too, in the same session:

    python -m bench.cold --model /tmp/mistral2l --adapters /tmp/mistral2l-adapters --out bench/results/cold-cpu
"""

from __future__ import annotations

import argparse
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
from merging.adapters import load_adapter
from merging.synthetic import write_random_adapter
from server.readiness import free_port, wait_until_ready

METHODS = {
    "ties": {"density": 0.2},
    "dare_ties": {"drop_rate": 0.5},
    "linear": {},
    "tsv": {},
}


def _mix(method: str, names: list[str], i: int) -> dict:
    """The ``i``-th variant of a method's mix over ``names``: weights (and knobs) differ per variant."""
    params = dict(METHODS[method])
    if "density" in params:
        params["density"] = round(0.1 + 0.05 * (i % 8), 2)
    if "drop_rate" in params:
        params["seed"] = 1000 + i
    children = [{"adapter": n, "weight": round(1.0 + 0.01 * i + 0.25 * k, 3)} for k, n in enumerate(names)]
    return {"method": method, **params, "children": children}


def _ttft(client: httpx.Client, url: str, mix: dict, prompt: str) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/generate", json={"prompt": prompt, "mix": mix, "max_tokens": 1, "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - t0


def run(model: Path, adapters: Path, mixes: int, threads: int, server_args: str) -> dict:
    names = sorted(p.name for p in adapters.iterdir() if p.is_dir())
    if len(names) < 3:
        raise SystemExit(f"--adapters {adapters} needs at least three adapters")
    root = Path(tempfile.mkdtemp(prefix="mixserve-cold-"))
    for n in names:
        shutil.copytree(adapters / n, root / n)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--model", str(model), "--adapters", str(root), "--port", str(port),
           "--insecure-admin", "--log-level", "warning", "--pin-file", os.devnull, *server_args.split()]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    out: dict = {"adapters": names, "rows": []}
    try:
        wait_until_ready(url, timeout=900, proc=proc)
        out["ready_seconds"] = time.perf_counter() - t0
        with httpx.Client(timeout=600) as client:
            prompt = "w5 w6 w7 w8 w9 w10 w11 w12"  # words of the random models' vocabulary, any text for the demo's
            _ttft(client, url, None, prompt)  # warm-up
            shapes = {m: f.shape for m, f in load_adapter(root / names[0], names[0]).modules.items()}
            write_random_adapter(root / "extra", shapes, rank=16, alpha=32.0, seed=99)
            t0 = time.perf_counter()
            r = client.post(url + "/admin/adapters", json={"name": "extra", "path": "extra"})
            r.raise_for_status()
            out["register_seconds"] = time.perf_counter() - t0
            sets = [names[:3], [*names[1:3], "extra"], [names[0], names[2], "extra"], [names[0], names[1], "extra"]]
            for method, members in zip(METHODS, sets, strict=False):
                first = client.post(
                    url + "/admin/mixes", json={"name": "w", "mix": _mix(method, members, 0), "pin": False}
                )
                first.raise_for_status()
                cold_merge, cold_ttft, warm_ttft = [], [], []
                for i in range(1, mixes + 1):
                    mix = _mix(method, members, i)
                    merged = client.post(url + "/admin/mixes", json={"name": "w", "mix": mix, "pin": False}).json()
                    cold_merge.append(merged["merge_seconds"])
                    fresh = _mix(method, members, 100 + i)  # never merged: the request merges it
                    cold_ttft.append(_ttft(client, url, fresh, prompt))
                    warm_ttft.append(_ttft(client, url, fresh, prompt))
                row = {"method": method, "set": members, "path": first.json().get("path", "factors"),
                       "first_merge_ms": 1e3 * first.json()["merge_seconds"],
                       "cold_merge_ms": 1e3 * statistics.median(cold_merge),
                       "cold_ttft_ms": 1e3 * statistics.median(cold_ttft),
                       "warm_ttft_ms": 1e3 * statistics.median(warm_ttft),
                       "bytes": first.json()["bytes"]}  # fmt: skip
                row["cold_vs_warm_ttft"] = row["cold_ttft_ms"] / row["warm_ttft_ms"]
                print(row, flush=True)
                out["rows"].append(row)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    return out


def to_markdown(result: dict) -> str:
    lines = [
        f"# Cold mixes through `mixserve serve` ({result['machine']})",
        "",
        f"Model `{result['model']}`, adapters {', '.join(result['adapters'])}; server at commit {result['commit']}"
        f"{', flags ' + result['server_args'] if result['server_args'] else ''}. Ready after {result['ready_seconds']:.1f} s; "
        f"registering one more rank-16 adapter took {1e3 * result['register_seconds']:.0f} ms. "
        f"Medians of {result['mixes']} mixes each.",
        "",
        "| method | adapter set | path | first mix of the set: merge | cold mix over the known set: merge "
        "| cold TTFT | warm TTFT | cold / warm | bytes cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {'+'.join(r['set'])} | {r['path']} | {r['first_merge_ms']:.1f} ms | "
            f"{r['cold_merge_ms']:.1f} ms | {r['cold_ttft_ms']:.1f} ms | {r['warm_ttft_ms']:.1f} ms | "
            f"{r['cold_vs_warm_ttft']:.2f} | {r['bytes'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF model directory")
    ap.add_argument("--adapters", type=Path, required=True, help="a directory of adapters (copied to a temp root)")
    ap.add_argument("--mixes", type=int, default=8, help="cold mixes per method (default 8)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="server CPU threads")
    ap.add_argument("--server-args", dest="server_args", default="", help="extra `mixserve serve` flags")
    ap.add_argument("--out", default="bench/results/cold-cpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    result = run(args.model, args.adapters, args.mixes, args.threads, args.server_args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result |= {"model": args.model.name, "commit": commit or "unknown", "server_args": args.server_args, "mixes": args.mixes,
               "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"}  # fmt: skip
    write_report(args.out, result, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
