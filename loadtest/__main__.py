"""``python -m loadtest``: sweep request rates against a server and write JSON + markdown + PNG.

    python -m loadtest --url http://127.0.0.1:8000 --rates 1,2,4,8 --duration 20 \\
        --mixes sql,json,code --out loadtest/results/mixserve
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from loadtest.generator import LoadGenerator, LoadSpec
from loadtest.report import SLO, plot_sweep, summarize, to_markdown


def parse_mixes(text: str) -> list:
    """Comma-separated names (``base`` = no mix), or ``@file.json`` holding a JSON list of names / specs."""
    if text.startswith("@"):
        return json.loads(Path(text[1:]).read_text())
    return [None if m == "base" else m for m in text.split(",") if m]


def sweep(spec: LoadSpec, rates: list[float], slo: SLO) -> list[dict]:
    runs = []
    for rate in rates:
        spec.rate = rate
        records, seconds = asyncio.run(LoadGenerator(spec).run())
        run = {"rate": rate, **summarize(records, seconds, slo)}
        print(json.dumps({k: run[k] for k in ("rate", "completed", "request_throughput", "ttft_p99_ms", "errors")}),
              flush=True)  # fmt: skip
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--rates", default="1,2,4", help="comma-separated Poisson request rates to sweep (req/s)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate (default 20)")
    ap.add_argument("--max-requests", dest="max_requests", type=int, default=500, help="per rate (default 500)")
    ap.add_argument("--mixes", default="base", help="names by Zipf popularity, first most popular; or @mixes.json")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--prompt-words", dest="prompt_words", default="8,48", help="min,max prompt words")
    ap.add_argument("--output-tokens", dest="output_tokens", default="16,64", help="min,max output tokens")
    ap.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/generate"])
    ap.add_argument("--model", default="mixserve-demo")
    ap.add_argument("--slo-ttft", dest="slo_ttft", type=float, default=1.0, help="goodput SLO on TTFT, seconds")
    ap.add_argument("--slo-tpot", dest="slo_tpot", type=float, default=0.1, help="goodput SLO on TPOT, seconds")
    ap.add_argument("--allow-remote", dest="allow_remote", action="store_true",
                    help="allow a non-loopback target (only a deployment you own)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="loadtest/results/run", help="writes <out>.json, <out>.md, <out>.png")
    args = ap.parse_args(argv)
    spec = LoadSpec(url=args.url.rstrip("/"), duration_s=args.duration, max_requests=args.max_requests,
                    mixes=parse_mixes(args.mixes), zipf_s=args.zipf,
                    prompt_words=tuple(map(int, args.prompt_words.split(","))),
                    output_tokens=tuple(map(int, args.output_tokens.split(","))), endpoint=args.endpoint,
                    model=args.model, seed=args.seed, allow_remote=args.allow_remote)  # fmt: skip
    runs = sweep(spec, [float(r) for r in args.rates.split(",")], SLO(args.slo_ttft, args.slo_tpot))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"url": spec.url, "runs": runs}, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(runs, spec.url))
    plot_sweep({spec.url: runs}, out.with_suffix(".png"))
    print(to_markdown(runs, spec.url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
