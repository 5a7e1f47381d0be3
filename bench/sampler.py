"""What mixed sampling parameters cost a decode step, at realistic width (issue 35).

    python -m bench.sampler --model /tmp/mistral2 [--batch 32] [--repeats 20] [--out bench/results/sampler-cpu]

A step is what the engine runs per decode: the forward over ``--batch`` rows (``ModelRuntime.decode``)
and the batched sampler over its logits (``server.engine.sampler``). Two batches of the same rows
alternate: every row greedy, and a mixed batch (a quarter each of: temperature + top-p, temperature +
top-k + min-p, presence / frequency / repetition penalties over 64 generated tokens, logit bias on 8
tokens; 8 rows seeded, 4 with 5 logprobs). The ratio mixed / greedy is the target (<= 1.05); the
sampler's own milliseconds and its host copies per step are reported beside it. The model:
``python -m bench.random_model --out /tmp/mistral2 --layers 2`` (Mistral-7B's width, vocabulary 32,000).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.ops import _kv_bytes
from bench.report import machine_line, write_report
from server.engine.sampler import Sampler, SampleRow
from server.engine.sampling import SamplingParams, make_generator
from server.worker.runtime import DecodeRow, ModelRuntime, PrefillChunk


def mixed_params(batch: int, vocab: int) -> list[SamplingParams]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(batch):
        kind = i % 4
        seed = 1000 + i if i % 4 == 0 or i % 4 == 1 else None
        logprobs = 5 if i % 8 == 3 else None
        if kind == 0:
            p = SamplingParams(temperature=0.8, top_p=0.9, seed=seed, logprobs=logprobs)
        elif kind == 1:
            p = SamplingParams(temperature=0.7, top_k=40, min_p=0.05, seed=seed, logprobs=logprobs)
        elif kind == 2:
            p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logprobs=logprobs)
        else:
            ids = torch.randint(0, vocab, (8,), generator=g).tolist()
            p = SamplingParams(logit_bias=tuple((t, -5.0) for t in ids), logprobs=logprobs)
        out.append(p)
    return out


def run(model_dir: Path, batch: int, context: int, repeats: int, device: str = "cpu", dtype: str = "float32") -> dict:
    max_len = context + 128
    torch_dtype = getattr(torch, dtype)
    runtime = ModelRuntime(model_dir, max_len=max_len, device=device, dtype=torch_dtype,
                           kv_cache_bytes=_kv_bytes(model_dir, batch, max_len) * torch_dtype.itemsize // 4)  # fmt: skip
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    vocab = runtime.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(context + 1)) for _ in range(batch)]
    runtime.prefill([PrefillChunk(prompt, 0, t) for t in tables])
    rows = [DecodeRow(prompt[-1], context, t) for t in tables]
    history = [torch.randint(0, vocab, (64,), generator=g).tolist() for _ in range(batch)]
    prompt_tokens = frozenset(prompt)
    device = runtime.device
    batches = {
        "greedy": [SampleRow(SamplingParams(), None, h) for h in history],
        "mixed": [
            SampleRow(p, make_generator(p), h, prompt_tokens if p.repetition_penalty != 1.0 else frozenset())
            for p, h in zip(mixed_params(batch, vocab), history, strict=True)
        ],
    }
    sampler = Sampler(device, seed=0)
    steps: dict[str, list[float]] = {k: [] for k in batches}
    sampling: dict[str, list[float]] = {k: [] for k in batches}
    copies: dict[str, int] = {}
    for i in range(repeats + 2):  # two warm-up rounds, alternating so drift hits both alike
        for name, sample_rows in batches.items():
            before = sampler.host_copies
            sync()
            t0 = time.perf_counter()
            logits = runtime.decode(rows)
            sync()
            t1 = time.perf_counter()
            sampler.sample(logits, sample_rows)  # ends on its host copy: synchronous
            t2 = time.perf_counter()
            copies[name] = sampler.host_copies - before
            if i >= 2:
                steps[name].append(t2 - t0)
                sampling[name].append(t2 - t1)
    med = {k: statistics.median(v) * 1e3 for k, v in steps.items()}
    samp = {k: statistics.median(v) * 1e3 for k, v in sampling.items()}
    return {
        "model": str(model_dir), "device": str(device), "dtype": dtype, "batch": batch, "context": context, "repeats": repeats, "vocab": vocab,
        "step_ms": med, "sampler_ms": samp, "ratio_mixed_over_greedy": med["mixed"] / med["greedy"],
        "host_copies_per_step": copies, "machine": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{machine_line()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def to_markdown(r: dict) -> str:
    lines = [f"# Sampling cost per decode step ({r['batch']} rows, {Path(r['model']).name}, vocab {r['vocab']})", "",
             "| batch | step ms (forward + sampler) | sampler ms | host copies per step |", "|---|---|---|---|"]  # fmt: skip
    for k in ("greedy", "mixed"):
        lines.append(f"| {k} | {r['step_ms'][k]:.1f} | {r['sampler_ms'][k]:.2f} | {r['host_copies_per_step'][k]} |")
    lines += ["", f"mixed / greedy: **{r['ratio_mixed_over_greedy']:.3f}** (target <= 1.05); median of "
              f"{r['repeats']} alternating steps; {r['machine']}; torch {r['torch']}; {r['date']}", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a model directory (bench/random_model.py)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=128, help="tokens already in each row's KV cache")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="bench/results/sampler-cpu")
    args = ap.parse_args()
    result = run(args.model, args.batch, args.context, args.repeats, args.device, args.dtype)
    write_report(args.out, result, to_markdown)


if __name__ == "__main__":
    main()
