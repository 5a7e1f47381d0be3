"""mixserve vs the PEFT switching baseline under the same open-loop load, on this machine.

Both servers run as subprocesses on 127.0.0.1 (one at a time, so they never share the CPU); the
same Poisson rates, Zipf mix popularity, prompts and output lengths are sent to each. The table
reports, per system, the highest offered rate whose p99 TTFT stays within the SLO.

    python -m loadtest.compare --rates 0.5,1,2,4,8,16 --duration 30 --out loadtest/results/compare-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from loadtest.generator import LoadGenerator, LoadSpec
from loadtest.report import SLO, plot_sweep, summarize, to_markdown
from mixserve.eval.tasks import TASKS, make_split
from server.readiness import free_port, wait_until_ready

# Zipf popularity: first most popular. Single adapters and merged mixes, as a team would send them.
MIXES = [
    "sql",
    {"method": "ties", "density": 0.5, "children": [{"adapter": "python"}, {"adapter": "pystr"}]},
    "json",
    {"method": "linear", "children": [{"adapter": "sql", "weight": 0.6}, {"adapter": "json", "weight": 0.4}]},
    "python",
    {"method": "dare_ties", "drop_rate": 0.5, "children": [{"adapter": a} for a in TASKS]},
    "pystr",
    {"method": "ties", "density": 0.3, "children": [{"adapter": a} for a in TASKS]},
]


def _start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env={**os.environ, "MIXSERVE_ADMIN_TOKEN": ""})
    try:
        wait_until_ready(url, path="/ready" if "mixserve.cli" in cmd else "/health", timeout=timeout, proc=proc)
    except Exception:
        proc.kill()
        raise
    return proc


def run_system(name: str, cmd: list[str], url: str, rates: list[float], args, prompts: list[str]) -> list[dict]:
    proc = _start(cmd, url)
    runs = []
    try:
        for rate in rates:
            spec = LoadSpec(url=url, rate=rate, duration_s=args.duration, max_requests=args.max_requests,
                            mixes=MIXES, zipf_s=args.zipf, prompts=prompts,
                            output_tokens=(args.output_tokens, args.output_tokens), seed=args.seed,
                            timeout_s=args.duration * 4)  # fmt: skip
            records, seconds = asyncio.run(LoadGenerator(spec).run())
            run = {"rate": rate, **summarize(records, seconds, SLO(args.slo_ttft, args.slo_tpot))}
            print(name, json.dumps({k: run[k] for k in ("rate", "completed", "request_throughput", "ttft_p99_ms",
                                                          "errors")}), flush=True)  # fmt: skip
            runs.append(run)
            if run["ttft_p99_ms"] is None or run["ttft_p99_ms"] > 10 * 1000 * args.slo_ttft:
                break  # far past saturation: higher rates only queue more
    finally:
        proc.terminate()
        proc.wait(60)
    return runs


def sustained_rate(runs: list[dict], slo_ttft_s: float) -> float:
    """Highest offered rate whose p99 TTFT is within the SLO and which lost no request."""
    ok = [r["rate"] for r in runs if r["ttft_p99_ms"] is not None and r["ttft_p99_ms"] <= 1000 * slo_ttft_s
          and r["completed"] == r["requests"]]  # fmt: skip
    return max(ok, default=0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2,4,8,16")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-requests", dest="max_requests", type=int, default=600)
    ap.add_argument("--output-tokens", dest="output_tokens", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--slo-ttft", dest="slo_ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", dest="slo_tpot", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="loadtest/results/compare-cpu")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    prompts = [e.prompt for t in TASKS for e in make_split(t, "test", 25, seed=5)]
    port = free_port()
    systems = {
        "mixserve": [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--port", str(port), "--max-batch", "32",
                     "--max-waiting", "4096", "--log-level", "warning"],
        "peft-switching": [sys.executable, "-m", "loadtest.baselines.peft_server", "--port", str(port)],
    }  # fmt: skip
    results = {name: run_system(name, cmd, f"http://127.0.0.1:{port}", rates, args, prompts)
               for name, cmd in systems.items()}  # fmt: skip
    sustained = {name: sustained_rate(runs, args.slo_ttft) for name, runs in results.items()}
    ratio = sustained["mixserve"] / sustained["peft-switching"] if sustained["peft-switching"] else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "args": vars(args), "mixes": MIXES,
            "sustained_rate_at_slo": sustained, "ratio": ratio}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    md = [f"Machine: {meta['machine']}. Open loop, Poisson arrivals, {args.duration:g} s per rate, "
          f"{args.output_tokens} output tokens (eos ignored), Zipf {args.zipf} over {len(MIXES)} mixes. "
          f"SLO: p99 TTFT <= {args.slo_ttft:g} s.", ""]  # fmt: skip
    md += [to_markdown(runs, name) for name, runs in results.items()]
    md += ["| system | highest rate within the SLO (req/s) |", "|---|---|"]
    md += [f"| {n} | {r:g} |" for n, r in sustained.items()]
    md += ["", f"mixserve / PEFT switching: {ratio:.1f}x" if ratio else "ratio: baseline sustained no rate"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot_sweep(results, out.with_suffix(".png"))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
