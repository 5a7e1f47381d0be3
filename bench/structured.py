"""Structured outputs and ``n`` through a real server on the demo (issue 35).

    python -m bench.structured [--n 100] [--rounds 5] [--out bench/results/structured-cpu]

Starts ``mixserve serve`` on the demo (127.0.0.1, a free port; the pinned ``all-tasks`` mix) and measures:

1. **validity and exact match**: the JSON task's first ``--n`` test prompts, greedy, with and without
   ``response_format`` ``json_schema`` (the demo's record schema), scored by ``mixserve.eval``'s JSON
   scorer; the same schema on as many SQL prompts (valid JSON of the schema expected, whatever the
   prompt asks);
2. **throughput**: 32 JSON requests at once (c = 32, greedy, ``max_tokens`` 64), all free or 8 of them
   schema-constrained, rounds alternating; completion tokens / s per round, median (target: mixed >=
   0.90x free);
3. **n = 4**: the prefill tokens the server counts (``mixserve_prefill_tokens_total``) and the wall
   time of one ``n=4`` request against four ``n=1`` requests sent at once (sampled, seeded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import jsonschema

from bench.report import machine_line, write_report
from mixserve.eval.scorers import json_scores
from mixserve.eval.tasks import make_split
from server.readiness import free_port, wait_until_ready

RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "city": {"type": "string"}, "job": {"type": "string"}}, "required": ["name", "age", "city", "job"]}  # fmt: skip
SCHEMA = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}}
MODEL = "all-tasks"


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def complete(client: httpx.AsyncClient, url: str, prompt: str, **extra) -> dict:
    r = await client.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 64,
                                                         "temperature": 0, **extra})  # fmt: skip
    r.raise_for_status()
    return r.json()


async def quality(url: str, n: int) -> dict:
    json_examples = make_split("json", "test", n)
    sql_examples = make_split("sql", "test", n)
    async with httpx.AsyncClient(timeout=600) as client:
        sem = asyncio.Semaphore(16)

        async def one(prompt: str, **extra) -> str:
            async with sem:
                return (await complete(client, url, prompt, **extra))["choices"][0]["text"]

        free = await asyncio.gather(*(one(e.prompt) for e in json_examples))
        constrained = await asyncio.gather(*(one(e.prompt, response_format=SCHEMA) for e in json_examples))
        sql = await asyncio.gather(*(one(e.prompt, response_format=SCHEMA) for e in sql_examples))

    def schema_valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), RECORD)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    def exact(texts: list[str]) -> float:
        return sum(json_scores(t, e.check["expected"])[1] for t, e in zip(texts, json_examples, strict=True)) / n

    return {"n": n, "json_exact_free": exact(free), "json_exact_schema": exact(constrained),
            "json_valid_free": sum(map(schema_valid, free)) / n, "json_valid_schema": sum(map(schema_valid, constrained)) / n,
            "sql_valid_schema": sum(map(schema_valid, sql)) / n}  # fmt: skip


async def throughput(url: str, rounds: int, constrained: int = 8, concurrency: int = 32) -> dict:
    prompts = [e.prompt for e in make_split("json", "test", concurrency, seed=1)]
    out: dict[str, list[float]] = {"free": [], "mixed": []}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(rounds + 1):  # the first round warms up (the schema compiles once)
            for name in ("free", "mixed"):
                t0 = time.perf_counter()
                answers = await asyncio.gather(*(
                    complete(client, url, p, **({"response_format": SCHEMA} if name == "mixed" and i < constrained else {}))
                    for i, p in enumerate(prompts)))  # fmt: skip
                wall = time.perf_counter() - t0
                if r:
                    out[name].append(sum(a["usage"]["completion_tokens"] for a in answers) / wall)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"concurrency": concurrency, "constrained": constrained, "rounds": rounds, "tokens_per_s": med,
            "ratio_mixed_over_free": med["mixed"] / med["free"], "per_round": out}  # fmt: skip


async def choices(url: str, repeats: int = 5) -> dict:
    prompt = make_split("json", "test", 1, seed=2)[0].prompt
    body = {"temperature": 1.0, "seed": 5, "max_tokens": 32, "ignore_eos": True}
    name = "mixserve_prefill_tokens_total"
    async with httpx.AsyncClient(timeout=600) as client:
        before = metric(url, name)
        await complete(client, url, prompt, n=4, **body)
        one_request = metric(url, name) - before
        before = metric(url, name)
        await asyncio.gather(*(complete(client, url, prompt, **body) for _ in range(4)))
        four_requests = metric(url, name) - before
        walls: dict[str, list[float]] = {"n=4": [], "4 x n=1": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            await complete(client, url, prompt, n=4, **body)
            walls["n=4"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(complete(client, url, prompt, **body) for _ in range(4)))
            walls["4 x n=1"].append(time.perf_counter() - t0)
    return {"prefill_tokens": {"n=4": one_request, "4 x n=1": four_requests},
            "wall_s": {k: statistics.median(v) for k, v in walls.items()}, "repeats": repeats}  # fmt: skip


def run(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--port", str(port), "--max-batch", "32"]
    proc = subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(url, timeout=600, proc=proc)
        result = {"quality": asyncio.run(quality(url, args.n)),
                  "throughput": asyncio.run(throughput(url, args.rounds)), "choices": asyncio.run(choices(url))}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    result |= {"command": " ".join(["python -m bench.structured", *sys.argv[1:]]), "model": MODEL,
               "machine": machine_line(),
               "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    return result


def to_markdown(r: dict) -> str:
    q, t, c = r["quality"], r["throughput"], r["choices"]
    return "\n".join([
        f"# Structured outputs and n on the demo (`{r['model']}`)", "",
        f"| JSON test prompts (n = {q['n']}) | valid against the schema | exact match |", "|---|---|---|",
        f"| free | {q['json_valid_free']:.1%} | {q['json_exact_free']:.1%} |",
        f"| `response_format` json_schema | {q['json_valid_schema']:.1%} | {q['json_exact_schema']:.1%} |",
        f"| SQL prompts, json_schema | {q['sql_valid_schema']:.1%} | |", "",
        f"Throughput at c = {t['concurrency']} (median of {t['rounds']} rounds): free {t['tokens_per_s']['free']:.0f} tok/s, "
        f"{t['constrained']} constrained {t['tokens_per_s']['mixed']:.0f} tok/s: **{t['ratio_mixed_over_free']:.3f}x** "
        "(target >= 0.90)", "",
        f"n = 4: prefill tokens {c['prefill_tokens']['n=4']:.0f} (4 x n = 1: {c['prefill_tokens']['4 x n=1']:.0f}); "
        f"wall {c['wall_s']['n=4']:.2f} s vs {c['wall_s']['4 x n=1']:.2f} s (median of {c['repeats']})", "",
        f"`{r['command']}`; {r['machine']}; {r['date']}", ""])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="test prompts per task for validity and exact match")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/structured-cpu")
    write_report((args := ap.parse_args()).out, run(args), to_markdown)


if __name__ == "__main__":
    main()
