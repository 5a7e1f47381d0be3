"""Serving benchmark: mixserve (a real server process, streaming HTTP) against PEFT baselines, one run.

Scenarios at each concurrency (closed loop: ``c`` clients, each sends its next request when the last
one finished): base only; every request on one pinned merged mix; requests spread over 8 pinned
mixes; requests spread over 32 distinct ad-hoc mixes (in the request body, merged once before timing);
cold mixes (each request a new mix: a merge per request). At the highest concurrency also
``8-mixes-long``: 8 mixes with prompts of mixed lengths, 16 tokens up to 1,024 or what the model's
context leaves (chunked prefill keeps the running streams' inter-token latency flat). Baselines, in this process, after
the server has exited (no CPU shared with it):

- PEFT naive ("switching"): one request at a time; per request ``add_weighted_adapter`` +
  ``set_adapter`` + ``generate`` + ``delete_adapter``; requests queue behind each other.
- PEFT mixed batch: the 8 mixes created once; each batch of ``c`` requests runs as one
  ``generate(adapter_names=[...])`` (static batching: a batch ends when its longest request ends).

Every request generates exactly ``--max-tokens`` tokens (eos ignored), so tokens/s compare like for
like. TTFT and inter-token latency are timed client-side for mixserve (SSE events) and per decode
step for PEFT (a logits processor's clock).

    python -m bench.serve --out bench/results/serve-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from bench.report import write_report
from mixserve.eval.tasks import TASKS, make_split
from server.config import DEMO_DIR, DTYPES
from server.readiness import free_port, wait_until_ready

# Eight mixes over the demo's four adapters: linear, TIES, DARE-TIES, nested, in the default lowrank space.
MIXES: dict[str, dict] = {
    "sql-json-linear": {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json"}]},
    "sql-json-ties": {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]},
    "code-linear": {"method": "linear", "children": [{"adapter": "python"}, {"adapter": "pystr"}]},
    "code-ties": {"method": "ties", "density": 0.5, "children": [{"adapter": "python"}, {"adapter": "pystr"}]},
    "all-ties": {"method": "ties", "density": 0.3, "children": [{"adapter": a} for a in TASKS]},
    "all-dare-ties": {"method": "dare_ties", "drop_rate": 0.5, "children": [{"adapter": a} for a in TASKS]},
    "sql-python-linear": {
        "method": "linear",
        "children": [{"adapter": "sql", "weight": 0.6}, {"adapter": "python", "weight": 0.4}],
    },
    "nested": {
        "method": "ties",
        "density": 0.5,
        "children": [
            {"method": "linear", "children": [{"adapter": "python"}, {"adapter": "pystr"}]},
            {"adapter": "sql"},
        ],
    },
}
# 32 distinct ad-hoc mixes (sent in each request's body, not pinned): the four adapters with other weights
# and methods, as clients composing their own mixes would send them.
ADHOC: list[dict] = [
    {"method": ("linear", "ties", "dare_ties", "task_arithmetic")[i % 4],
     "children": [{"adapter": a, "weight": round(0.5 + ((i * 7 + k * 3) % 11) / 10, 2)} for k, a in enumerate(TASKS)]}
    for i in range(32)
]  # fmt: skip
PEFT_COMBINATION = {"linear": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd"}


@dataclass
class RequestTiming:
    ttft: float
    itl: list[float]
    tokens: int
    e2e: float


@dataclass
class ScenarioResult:
    system: str
    scenario: str
    concurrency: int
    requests: int
    seconds: float
    timings: list[RequestTiming] = field(default_factory=list)

    rounds_tokens_per_s: list[float] = field(default_factory=list)  # one per round, when several

    def summary(self) -> dict:
        tokens = sum(t.tokens for t in self.timings)
        ttft = sorted(t.ttft for t in self.timings)
        itl = sorted(x for t in self.timings for x in t.itl)
        rate = statistics.median(self.rounds_tokens_per_s) if self.rounds_tokens_per_s else tokens / self.seconds
        return {
            "system": self.system, "scenario": self.scenario, "concurrency": self.concurrency,
            "requests": self.requests, "seconds": round(self.seconds, 3), "tokens": tokens,
            "tokens_per_s": round(rate, 1), "rounds": len(self.rounds_tokens_per_s) or 1,
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99),
        }  # fmt: skip


def pooled(runs: list[ScenarioResult]) -> ScenarioResult:
    """Rounds of one scenario as one result: tokens/s the median of the rounds', latencies pooled."""
    first = runs[0]
    out = ScenarioResult(first.system, first.scenario, first.concurrency, sum(r.requests for r in runs),
                         sum(r.seconds for r in runs), [t for r in runs for t in r.timings])  # fmt: skip
    out.rounds_tokens_per_s = [sum(t.tokens for t in r.timings) / r.seconds for r in runs]
    return out


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return round(1000 * sorted_values[i], 3)


def prompts(n: int) -> list[str]:
    per = -(-n // len(TASKS))
    out = [ex.prompt for task in TASKS for ex in make_split(task, "test", per, seed=11)]
    return [out[(i * 7) % len(out)] for i in range(n)]  # interleave the tasks


# ------------------------------------------------------------------------------------------ mixserve


class ServerProcess:
    """``mixserve serve`` on 127.0.0.1 with the 8 mixes pinned, in its own process."""

    def __init__(self, model: Path, adapters: Path, max_batch: int, threads: int, extra: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._pins = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        json.dump(MIXES, self._pins)  # JSON is YAML
        self._pins.close()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--model", str(model), "--adapters", str(adapters),
               "--port", str(self.port), "--max-batch", str(max_batch), "--max-waiting", "4096",
               "--pin-file", self._pins.name, "--insecure-admin", "--log-level", "warning", *extra.split()]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_until_ready(self.url, timeout=timeout, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        os.unlink(self._pins.name)


def long_prompts(model_dir: Path, n: int, max_tokens: int) -> list[str]:
    """``n`` prompts of about 16 to min(1024, context - max_tokens - 8) tokens, spread evenly and
    interleaved short / long: the task prompts with filler text in front (lengths are approximate:
    the text is tokenized again by the server)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    longest = min(1024, AutoConfig.from_pretrained(model_dir).max_position_embeddings - max_tokens - 8)
    lengths = [16 + (longest - 16) * i // max(1, n - 1) for i in range(n)]
    lengths = [lengths[(i * 7) % n] for i in range(n)] if n % 7 else lengths
    filler = tok(" the river runs past the old mill and the town." * 200, add_special_tokens=False)["input_ids"]
    out = []
    for text, length in zip(prompts(n), lengths, strict=True):
        ids = tok(text)["input_ids"]
        kept = [i for i in (filler[: max(0, length - len(ids))] + ids)[-length:] if i != tok.bos_token_id]
        out.append(tok.decode(kept))  # special tokens other than BOS stay (a word-level vocabulary's <unk>)
    return out


async def _one_request(client: httpx.AsyncClient, url: str, prompt, mix, max_tokens: int) -> RequestTiming:
    body = {"prompt": prompt, "mix": mix, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(event["error"])
            n = len(event["token_ids"])
            if n:
                times.append(time.perf_counter())
                tokens += n
    itl = [b - a for a, b in itertools.pairwise(times)]
    return RequestTiming(times[0] - t0, itl, tokens, time.perf_counter() - t0)


async def run_mixserve(url: str, scenario: str, concurrency: int, n: int, max_tokens: int,
                       model_dir: Path | None = None, cold_seed: int = 10_000) -> ScenarioResult:  # fmt: skip
    """One closed-loop scenario; ``cold`` requests use DARE seeds ``cold_seed + i`` (new ones per call,
    or they would hit the cache)."""
    names = list(MIXES)
    texts = long_prompts(model_dir, n, max_tokens) if scenario == "8-mixes-long" else prompts(n)

    def mix_for(i: int):
        if scenario == "base":
            return None
        if scenario == "one-mix":
            return names[1]
        if scenario in ("8-mixes", "8-mixes-long"):
            return names[i % len(names)]
        if scenario == "32-adhoc":
            return ADHOC[i % len(ADHOC)]
        # cold: a mix never seen before (another DARE seed), so every request merges
        return {**MIXES["all-dare-ties"], "seed": cold_seed + i}

    queue = list(range(n))
    timings: list[RequestTiming] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop(0)
            timings.append(await _one_request(client, url, texts[i], mix_for(i), max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await _one_request(client, url, texts[0], mix_for(0) if scenario != "cold" else None, 4)  # warm-up
        if scenario == "32-adhoc":  # merged once (cached), as pinned mixes are before the run
            for mix in ADHOC:
                await _one_request(client, url, texts[0], mix, 1)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return ScenarioResult("mixserve", scenario, concurrency, n, seconds, timings)


# ---------------------------------------------------------------------------------------------- PEFT
class _StepClock:
    """A logits processor that only records when each decode step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:  # the clock must read when the step is done, not when it was queued
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def _peft_model(model_dir: Path, adapters_dir: Path, device: str = "cpu", dtype: str = "float32"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    names = sorted(p.name for p in adapters_dir.iterdir() if p.is_dir())
    model = PeftModel.from_pretrained(base, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name, adapter_name=name)
    return model, tok


def _add_mix(model, name: str, spec: dict, combination: str | None = None) -> None:
    """A mix as PEFT builds it: nested mixes are built bottom-up under temporary names. ``combination``
    overrides every mix's PEFT combination type (``cat``: no SVDs, for 7B-sized runs)."""
    children = []
    for j, child in enumerate(spec["children"]):
        if "adapter" in child:
            children.append((child["adapter"], child.get("weight", 1.0)))
        else:
            sub = f"{name}__{j}"
            _add_mix(model, sub, child, combination)
            children.append((sub, child.get("weight", 1.0)))
    kind = combination or PEFT_COMBINATION[spec["method"]]
    kwargs = {"density": spec.get("density", 1 - spec.get("drop_rate", 0.5))} if "ties" in kind else {}
    model.add_weighted_adapter([c[0] for c in children], [c[1] for c in children], name,
                               combination_type=kind, **kwargs)  # fmt: skip


def _generate(model, tok, batch: list[str], max_tokens: int, adapter_names=None) -> tuple[float, list[float]]:
    clock = _StepClock()
    enc = tok(batch, return_tensors="pt", padding=True).to(model.device)
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                       logits_processor=[clock], pad_token_id=tok.pad_token_id, **kwargs)  # fmt: skip
    return clock.times[0], [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]


def run_peft_naive(
    model, tok, concurrency: int, n: int, max_tokens: int, combination: str | None = None
) -> ScenarioResult:
    """c clients, one server that serves one request at a time (FIFO), switching adapters per request.

    Closed loop: request ``i`` comes from client ``i % c`` and arrives when that client's previous
    request (``i - c``) is done; the first ``c`` arrive at the start.
    """
    names, texts = list(MIXES), prompts(n)
    timings: list[RequestTiming] = []
    done: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        came = t0 if i < concurrency else done[i - concurrency]
        name = f"req{i}"
        _add_mix(model, name, MIXES[names[i % len(names)]], combination)
        model.set_adapter(name)
        first, itl = _generate(model, tok, [texts[i]], max_tokens)
        done.append(time.perf_counter())
        for leftover in [a for a in list(model.peft_config) if a == name or a.startswith(name + "__")]:
            model.delete_adapter(leftover)
        timings.append(RequestTiming(first - came, itl, max_tokens, done[-1] - came))
    return ScenarioResult("peft-naive", "8-mixes", concurrency, n, time.perf_counter() - t0, timings)


def run_peft_mixed_batch(model, tok, concurrency: int, n: int, max_tokens: int) -> ScenarioResult:
    names, texts = list(MIXES), prompts(n)
    timings: list[RequestTiming] = []
    t0 = time.perf_counter()
    for start in range(0, n, concurrency):
        idx = list(range(start, min(n, start + concurrency)))
        came = time.perf_counter()
        first, itl = _generate(model, tok, [texts[i] for i in idx], max_tokens, [names[i % len(names)] for i in idx])
        done = time.perf_counter()
        timings += [RequestTiming(first - came, itl, max_tokens, done - came) for _ in idx]
    return ScenarioResult("peft-mixed-batch", "8-mixes", concurrency, n, time.perf_counter() - t0, timings)


# ------------------------------------------------------------------------------------------- report
def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["system"], r["scenario"], r["concurrency"]): r for r in rows}
    out = []

    def add(label: str, num, den, key: str = "tokens_per_s", target: str = "") -> None:
        if num and den and num.get(key) and den.get(key):
            out.append({"ratio": label, "value": round(num[key] / den[key], 3), "target": target})

    for c in sorted({r["concurrency"] for r in rows}):
        add(f"8 mixes / one mix, tokens/s, c={c}", by.get(("mixserve", "8-mixes", c)),
            by.get(("mixserve", "one-mix", c)), target=">= 0.95 at c=8 and 32")  # fmt: skip
        add(f"32 ad-hoc mixes / one mix, tokens/s, c={c}", by.get(("mixserve", "32-adhoc", c)),
            by.get(("mixserve", "one-mix", c)), target=">= 0.95 at c=32")  # fmt: skip
        add(f"mixserve 8 mixes / PEFT naive, tokens/s, c={c}", by.get(("mixserve", "8-mixes", c)),
            by.get(("peft-naive", "8-mixes", c)), target=">= 5 at c=32" if c == 32 else "")  # fmt: skip
        add(f"mixserve 8 mixes / PEFT mixed batch, tokens/s, c={c}", by.get(("mixserve", "8-mixes", c)),
            by.get(("peft-mixed-batch", "8-mixes", c)), target=">= 2 at c=32" if c == 32 else "")  # fmt: skip
        add(f"cold mixes / 8 pinned mixes, tokens/s, c={c}", by.get(("mixserve", "cold", c)),
            by.get(("mixserve", "8-mixes", c)))  # fmt: skip
        add(f"8 mixes / base, ITL p50, c={c}", by.get(("mixserve", "8-mixes", c)), by.get(("mixserve", "base", c)),
            "itl_p50_ms", "<= 1.15 at c=8 (realistic width)" if c == 8 else "")  # fmt: skip
        long = by.get(("mixserve", "8-mixes-long", c))
        if long and long.get("itl_p50_ms"):
            out.append({"ratio": f"ITL p99 / p50, 8 mixes, mixed prompt lengths, c={c}",
                        "value": round(long["itl_p99_ms"] / long["itl_p50_ms"], 3), "target": "<= 3"})  # fmt: skip
    add("one mix / base, ITL p50, c=1", by.get(("mixserve", "one-mix", 1)), by.get(("mixserve", "base", 1)),
        "itl_p50_ms", "<= 1.10 (realistic width)")  # fmt: skip
    return out


def to_markdown(result: dict) -> str:
    cols = ["system", "scenario", "concurrency", "requests", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms"]  # fmt: skip
    lines = [f"Machine: {result['machine']}; model: {result['model']}; {result['max_tokens']} tokens per request, "
             f"eos ignored; {result.get('device', 'cpu')} {result.get('dtype', 'float32')}, PEFT mixes: "
             f"{result.get('peft_combination', 'per method')}; {result.get('rounds', 1)} rounds per scenario taking turns (tokens/s: the median "
             "round's; latency percentiles over every round), PEFT naive one round.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in result["rows"]]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['value']} | {r['target']} |" for r in result["ratios"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_DIR / "base")
    ap.add_argument("--adapters", type=Path, default=DEMO_DIR / "adapters")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="requests per scenario (default: max(8, 2 x c))")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for server and PEFT")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario, taking turns; tokens/s is the "
                    "median round's, latency percentiles pool every round (default 3)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="server and PEFT device, e.g. cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="server and PEFT weights' dtype (default float32)")  # fmt: skip
    ap.add_argument("--skip-peft", dest="skip_peft", action="store_true")
    ap.add_argument("--skip-peft-naive", dest="skip_peft_naive", action="store_true",
                    help="skip PEFT's one-request-at-a-time baseline (minutes at 7B size)")  # fmt: skip
    ap.add_argument("--peft-combination", dest="peft_combination", default=None, choices=("cat", "linear"),
                    help="build every PEFT mix with this combination instead of the methods' (ties_svd and "
                    "dare_ties_svd run an SVD per module: minutes at 7B size)")  # fmt: skip
    ap.add_argument("--skip-cold", dest="skip_cold", action="store_true", help="skip the merge-per-request scenario")
    ap.add_argument("--skip-long", dest="skip_long", action="store_true", help="skip the mixed-prompt-length scenario")
    ap.add_argument("--server-args", dest="server_args", default="", help="extra `mixserve serve` flags, e.g. "
                    "'--max-len 2048'")  # fmt: skip
    ap.add_argument("--out", default="bench/results/serve-cpu", help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    count = {c: args.requests or max(8, 2 * c) for c in levels}
    rows: list[dict] = []

    def save() -> None:  # after every scenario: a run stopped by a time limit keeps what it measured
        gpu = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
        result = {
            "machine": f"{gpu}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
            "model": str(args.model), "max_tokens": args.max_tokens, "threads": args.threads, "rounds": args.rounds,
            "device": args.device, "dtype": args.dtype, "peft_combination": args.peft_combination or "per method",
            "mixes": MIXES, "rows": rows, "ratios": ratios(rows),
        }  # fmt: skip
        write_report(args.out, result, to_markdown)

    cold_seed = 10_000
    placement = f"--device {args.device} --dtype {args.dtype} "
    server = ServerProcess(args.model, args.adapters, max(levels), args.threads, placement + args.server_args)
    try:
        server.wait_ready()
        for c in levels:
            scenarios = ["base", "one-mix", "8-mixes", "32-adhoc"] + (["cold"] if not args.skip_cold else [])
            scenarios += ["8-mixes-long"] if c == max(levels) and not args.skip_long else []
            runs: dict[str, list[ScenarioResult]] = {s: [] for s in scenarios}
            for _ in range(args.rounds):  # scenarios take turns: machine noise hits each of them
                for scenario in scenarios:
                    cold_seed += count[c]
                    runs[scenario].append(asyncio.run(run_mixserve(server.url, scenario, c, count[c],
                                                                   args.max_tokens, args.model, cold_seed)))  # fmt: skip
            for scenario in scenarios:
                r = pooled(runs[scenario]).summary()
                print(json.dumps(r), flush=True)
                rows.append(r)
                save()
    finally:
        server.stop()
    if not args.skip_peft:
        torch.set_num_threads(args.threads)
        model, tok = _peft_model(args.model, args.adapters, args.device, args.dtype)
        for name, spec in MIXES.items():
            _add_mix(model, name, spec, args.peft_combination)
        _generate(model, tok, prompts(1), 4, [next(iter(MIXES))])  # warm-up
        for c in levels:
            if not args.skip_peft_naive:
                r = run_peft_naive(
                    model, tok, c, count[c], args.max_tokens, args.peft_combination
                ).summary()  # far behind: one round
                print(json.dumps(r), flush=True)
                rows.append(r)
                save()
            mixed = [run_peft_mixed_batch(model, tok, c, count[c], args.max_tokens) for _ in range(args.rounds)]
            r = pooled(mixed).summary()
            print(json.dumps(r), flush=True)
            rows.append(r)
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
