"""Decode-step cost proxy: top-level aten ops and wall time of one ``ModelRuntime.decode`` step.

On a GPU every top-level op is at least one kernel launch, so the op count of a decode step is what
bounds small-batch decode once the weights are read; on a CPU it is the interpreter and dispatch
overhead a small model shows most. Scenarios, one batch of ``--batch`` rows each (every row's
sequence already holds ``--context`` tokens):

- ``base``: no adapter;
- ``1 mix``: every row on one merged mix, served from full factors (the factor pool);
- ``N mixes``: the rows spread over ``--mixes`` different merged mixes (factor pool);
- ``1 core mix``, ``N core mixes``: the same over mixes of a ``--family``-adapter family, served from the
  family's shared bases and per-mix cores (the core pool).

Factor mixes are random rank-``--rank`` factors on all seven projections (what the mix cache hands the
runtime: only the shapes matter here); core mixes are weighted sums of ``--family`` random
rank-``--rank`` adapters merged on the family's coordinates (cores of ``family x rank`` squared per
module). All are loaded in their pool before timing. Ops are counted with ``torch.profiler`` as the aten
ops whose parent is not an aten op; per layer = the step's count / layers (the embedding and logits
included).
Step time: the median of ``--repeats`` steps after three warm-up rounds, the scenarios taking turns.

    python -m bench.ops --out bench/results/ops-cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.report import write_report
from merging.core_merge import merge_core
from merging.family import AdapterFamily
from merging.spec import parse_mix
from merging.synthetic import random_adapter
from server.config import DEMO_DIR
from server.core_pool import PreparedCores
from server.kv_cache import bytes_per_block
from server.lora_pool import PreparedLora
from server.runtime import DecodeRow, ModelRuntime, PrefillChunk


def random_mix(runtime: ModelRuntime, rank: int, seed: int) -> PreparedLora:
    """Random rank-``rank`` factors on every adaptable projection, laid out as the server serves them."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, shape in runtime.base_shapes().items():
        out_f, in_f = shape
        A = torch.randn(rank, in_f, generator=g) / in_f**0.5
        B = torch.randn(out_f, rank, generator=g) * 0.01
        factors[name.removesuffix(".weight")] = (A, B)
    return runtime.lora_to_device(factors)


def random_core_mixes(runtime: ModelRuntime, n_adapters: int, rank: int, mixes: int) -> list[PreparedCores]:
    """``mixes`` distinct weighted sums of a family of ``n_adapters`` random adapters, as served cores."""
    shapes = {name.removesuffix(".weight"): shape for name, shape in runtime.base_shapes().items()}
    family, _ = AdapterFamily().extend_all(
        random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=100 + i) for i in range(n_adapters)
    )
    runtime.cores.install(family)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(mixes):
        weights = (torch.rand(n_adapters, generator=g) + 0.5).tolist()
        mix = parse_mix({"method": "task_arithmetic", "children": [{"adapter": f"a{i}", "weight": w}
                                                                   for i, w in enumerate(weights)]})  # fmt: skip
        out.append(runtime.cores_to_device(merge_core(mix, family)))
    return out


def slots_for(batch: int, slots: list[int]) -> list[int]:
    """``batch`` rows split as evenly as possible over the pool ``slots``, in slot order."""
    bounds = [round(i * batch / len(slots)) for i in range(len(slots) + 1)]
    return [s for a, b, s in zip(bounds, bounds[1:], slots, strict=False) for _ in range(b - a)]


def _kv_bytes(model_dir: Path, batch: int, max_len: int, block_size: int = 16) -> int:
    """A KV cache for ``batch`` full contexts (plus the reserved block)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_block = bytes_per_block(c.num_hidden_layers, block_size, kv_heads, head_dim, torch.float32)
    return per_block * (batch * -(-max_len // block_size) + 1)


def count_top_level_ops(fn) -> int:
    """Aten ops called by ``fn`` whose caller is not itself an aten op (what dispatches, or launches)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for ev in prof.events():
        parent = ev.cpu_parent
        if ev.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            count += 1
    return count


def run(model_dir: Path, batch: int, mixes: int, rank: int, context: int, repeats: int, family: int,
        factors: bool = True) -> dict:  # fmt: skip
    max_len = max(context + 16, 64)
    runtime = ModelRuntime(model_dir, max_len=max_len, max_loras=mixes if factors else 1, core_slots=mixes,
                           kv_cache_bytes=_kv_bytes(model_dir, batch, max_len))  # fmt: skip
    layers = len(runtime.layers)
    scenarios: dict[str, tuple[list[int], list[int]]] = {"base": ([0], [0])}
    if factors:
        pool = [runtime.pool.acquire(random_mix(runtime, rank, seed)) for seed in range(mixes)]
        scenarios |= {"1 mix": (pool[:1], [0]), f"{mixes} mixes": (pool, [0])}
    cores = [runtime.cores.acquire(c) for c in random_core_mixes(runtime, family, rank, mixes)]
    scenarios |= {"1 core mix": ([0], cores[:1]), f"{mixes} core mixes": ([0], cores)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runtime.config.vocab_size, (context,), generator=g).tolist()
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(context + 1)) for _ in range(batch)]
    # The base model's KV for every row: the decode step's work does not depend on it.
    runtime.prefill([PrefillChunk(prompt, 0, t) for t in tables])
    steps = {}
    for label, (factor_slots, core_slots) in scenarios.items():
        slots, core = slots_for(batch, factor_slots), slots_for(batch, core_slots)
        tokens = [int(t) for t in torch.randint(0, runtime.config.vocab_size, (batch,), generator=g)]
        rows = [DecodeRow(tok, context, t, s, c) for tok, t, s, c in zip(tokens, tables, slots, core, strict=True)]
        steps[label] = (len(set(slots) - {0}) + len(set(core) - {0}), lambda rows=rows: runtime.decode(rows))
    ops = {label: count_top_level_ops(step) for label, (_, step) in steps.items()}
    # Timed round-robin (base, 1 mix, N mixes, base, ...): noise on a shared machine hits every scenario.
    times: dict[str, list[float]] = {label: [] for label in steps}
    for i in range(repeats + 3):
        for label, (_, step) in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 3:  # warm-up rounds
                times[label].append(time.perf_counter() - t0)
    rows = [
        {"scenario": label, "mixes": n_mixes, "ops_per_step": ops[label], "ops_per_layer": ops[label] / layers,
         "step_ms": 1e3 * statistics.median(times[label])}
        for label, (n_mixes, _) in steps.items()
    ]  # fmt: skip
    base = rows[0]
    for r in rows:  # each scenario against the one-mix scenario of its own pool
        one = next(o for o in rows if o["scenario"] == ("1 core mix" if "core" in r["scenario"] else "1 mix"))
        r["ops_vs_one_mix"] = r["ops_per_step"] / one["ops_per_step"]
        r["time_vs_one_mix"] = r["step_ms"] / one["step_ms"]
        r["ops_per_layer_over_base"] = (r["ops_per_step"] - base["ops_per_step"]) / layers
        r["ops_per_layer_over_one_mix"] = (r["ops_per_step"] - one["ops_per_step"]) / layers
        r["time_vs_base"] = r["step_ms"] / base["step_ms"]
    return {
        "model": str(model_dir),
        "layers": layers,
        "hidden": runtime.config.hidden_size,
        "batch": batch,
        "rank": rank,
        "context": context,
        "repeats": repeats,
        "projections": len(runtime.linears) // layers,
        "family": family,
        "core_rank": runtime.cores.rank,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Decode-step ops and time ({result['machine']})",
        "",
        f"Model `{Path(result['model']).name}` ({result['layers']} layers, hidden {result['hidden']}); batch "
        f"{result['batch']}, every row at position {result['context']}; mixes of rank {result['rank']} on all "
        f"{result['projections']} projections; core mixes over a family of {result['family']} such adapters "
        f"(cores {result['core_rank']} x {result['core_rank']} per module); step time = median of "
        f"{result['repeats']} steps. 'vs one mix' compares with the one-mix scenario of the same pool.",
        "",
        "| scenario | mixes in the batch | top-level aten ops / step | per layer | per layer over base | per layer over "
        "one mix | step ms | vs base | vs one mix |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scenario']} | {r['mixes']} | {r['ops_per_step']} | {r['ops_per_layer']:.1f} | "
            f"{r['ops_per_layer_over_base']:+.1f} | {r['ops_per_layer_over_one_mix']:+.1f} | {r['step_ms']:.2f} | "
            f"{r['time_vs_base']:.2f}x | {r['time_vs_one_mix']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "base", help="HF model directory (default: the demo)")
    parser.add_argument("--batch", type=int, default=8, help="rows in the decode batch (default 8)")
    parser.add_argument("--mixes", type=int, default=8, help="distinct mixes in the many-mix scenario (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="rank of each random mix (default 16)")
    parser.add_argument("--context", type=int, default=32, help="tokens already in every row's KV (default 32)")
    parser.add_argument("--family", type=int, default=4, help="adapters in the core mixes' family (default 4)")
    parser.add_argument("--no-factors", dest="factors", action="store_false",
                        help="skip the factor-pool scenarios (core mixes and the base only)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per scenario (default 50)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; the server uses cores - 1)")
    parser.add_argument("--out", default="bench/results/ops-cpu", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.mixes <= args.batch:
        parser.error("--mixes must be between 1 and --batch")
    result = run(args.model, args.batch, args.mixes, args.rank, args.context, args.repeats, args.family, args.factors)
    write_report(args.out, result, to_markdown)


if __name__ == "__main__":
    main()
