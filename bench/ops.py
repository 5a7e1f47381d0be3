"""Decode-step cost proxy: top-level aten ops and wall time of one ``ModelRuntime.decode`` step.

On a GPU every top-level op is at least one kernel launch, so the op count of a decode step is what
bounds small-batch decode once the weights are read; on a CPU it is the interpreter and dispatch
overhead a small model shows most. Scenarios, one batch of ``--batch`` rows each (every row's
sequence already holds ``--context`` tokens):

- ``base``: no adapter;
- ``1 mix``: every row on one merged mix, served from full factors (the factor pool);
- ``N mixes``: the rows spread over ``--mixes`` different merged mixes (factor pool);
- ``1 member mix``: every row on one lowrank mix of ``--members`` adapters, served as the server serves
  it (the member pool: adapters resident once as their own factors, the mix a small core over them);
- ``N member mixes over 8``: the rows spread over ``--mixes`` mixes, each of ``--members`` adapters drawn
  from 8 of them;
- ``N member mixes over A``: the same with the members drawn from all ``--adapters`` registered.

Factor mixes are random rank-``--rank`` factors on all seven projections (what the mix cache hands the
runtime: only the shapes matter here); member mixes are TIES merges of random rank-``--rank`` adapters
(only the adapters a mix reads are made). All are loaded in their pool before timing. For the member
scenarios the table gives the distinct adapters a step reads and what its bytes allow: one mix's step
times ``(weights + the step's distinct adapters) / (weights + one mix's adapters)``. Ops are counted with ``torch.profiler`` as the aten
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
from merging.member_merge import merge_members
from merging.spec import parse_mix
from merging.synthetic import random_adapter
from server.adapters.lora_pool import PreparedLora
from server.adapters.member_pool import PreparedMembers
from server.config import DEMO_DIR
from server.worker.kv_cache import bytes_per_block
from server.worker.runtime import DecodeRow, ModelRuntime, PrefillChunk


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


def random_member_mixes(runtime: ModelRuntime, draw_from: int, members: int, rank: int, mixes: int,
                        seed: int = 1) -> tuple[list[PreparedMembers], int]:  # fmt: skip
    """``mixes`` distinct TIES mixes of ``members`` random adapters each, drawn from ``draw_from`` adapters,
    as the server serves them; returns them and how many distinct adapters they read."""
    shapes = {name.removesuffix(".weight"): shape for name, shape in runtime.base_shapes().items()}
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randperm(draw_from, generator=g)[:members].tolist() for _ in range(mixes)]
    adapters = {f"a{i}": random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=100 + i)
                for i in sorted({i for d in draws for i in d})}  # fmt: skip
    out = []
    for d in draws:
        weights = (torch.rand(members, generator=g) + 0.5).tolist()
        mix = parse_mix({"method": "ties", "density": 0.5, "children": [{"adapter": f"a{i}", "weight": w}
                                                                         for i, w in zip(d, weights, strict=True)]})  # fmt: skip
        out.append(runtime.members_to_device(merge_members(mix, adapters), adapters))
    return out, len(adapters)


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


def run(model_dir: Path, batch: int, mixes: int, rank: int, context: int, repeats: int, adapters: int = 64,
        members: int = 3, factors: bool = True, factor_rank: int | None = None,
        dense_max: int | None = None) -> dict:  # fmt: skip
    """``factor_rank``: the factor mixes' rank (default ``members x rank``: what the factor path holds for
    a merge of ``members`` adapters, the same load as the member mixes)."""
    factor_rank = factor_rank or members * rank
    max_len = max(context + 16, 64)
    slots_needed = members * (2 * mixes + 1)
    runtime = ModelRuntime(model_dir, max_len=max_len, max_loras=mixes if factors else 1, core_slots=2 * mixes + 1,
                           adapter_slots=max(16, slots_needed), max_members=members,
                           kv_cache_bytes=_kv_bytes(model_dir, batch, max_len))  # fmt: skip
    layers = len(runtime.layers)
    if dense_max is not None:
        runtime.cores.dense_max = dense_max
    scenarios: dict[str, tuple[list[int], list[int]]] = {"base": ([0], [0])}
    if factors:
        pool = [runtime.pool.acquire(random_mix(runtime, factor_rank, seed)) for seed in range(mixes)]
        scenarios |= {"1 mix": (pool[:1], [0]), f"{mixes} mixes": (pool, [0])}
    few, _ = random_member_mixes(runtime, min(8, adapters), members, rank, mixes)
    many, distinct = random_member_mixes(runtime, adapters, members, rank, mixes, seed=2)
    few_slots = [runtime.cores.acquire(m) for m in few]
    many_slots = [runtime.cores.acquire(m) for m in many]
    scenarios |= {"1 member mix": ([0], few_slots[:1]), f"{mixes} member mixes over {min(8, adapters)}": ([0], few_slots),
                  f"{mixes} member mixes over {adapters}": ([0], many_slots)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runtime.config.vocab_size, (context,), generator=g).tolist()
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(context + 1)) for _ in range(batch)]
    # The base model's KV for every row: the decode step's work does not depend on it.
    runtime.prefill([PrefillChunk(prompt, 0, t) for t in tables])
    steps, reads = {}, {}
    pool = runtime.cores
    for label, (factor_slots, core_slots) in scenarios.items():
        slots, core = slots_for(batch, factor_slots), slots_for(batch, core_slots)
        tokens = [int(t) for t in torch.randint(0, runtime.config.vocab_size, (batch,), generator=g)]
        rows = [DecodeRow(tok, context, t, s, c) for tok, t, s, c in zip(tokens, tables, slots, core, strict=True)]
        steps[label] = (len(set(slots) - {0}) + len(set(core) - {0}), lambda rows=rows: runtime.decode(rows))
        reads[label] = len({a for c in set(core) - {0} for a in pool._members[c]})
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
        {"scenario": label, "mixes": n_mixes, "adapters_read": reads[label], "ops_per_step": ops[label],
         "ops_per_layer": ops[label] / layers, "step_ms": 1e3 * statistics.median(times[label])}
        for label, (n_mixes, _) in steps.items()
    ]  # fmt: skip
    base = rows[0]
    weights = runtime.weight_bytes
    per_adapter = pool.adapter_bytes(next(iter(pool.adapters.loaded()))[1])
    for r in rows:  # each scenario against the one-mix scenario of its own pool
        label = "1 member mix" if "member" in r["scenario"] else "1 mix"
        one = next((o for o in rows if o["scenario"] == label), base)  # (--no-factors: the base is its own)
        r["ops_vs_one_mix"] = r["ops_per_step"] / one["ops_per_step"]
        r["time_vs_one_mix"] = r["step_ms"] / one["step_ms"]
        r["ops_per_layer_over_base"] = (r["ops_per_step"] - base["ops_per_step"]) / layers
        r["ops_per_layer_over_one_mix"] = (r["ops_per_step"] - one["ops_per_step"]) / layers
        r["time_vs_base"] = r["step_ms"] / base["step_ms"]
        if "member" in r["scenario"]:  # what the bytes allow: one mix's step x the step's bytes / one mix's
            r["bytes_allow_vs_one_mix"] = (weights + r["adapters_read"] * per_adapter) / (
                weights + members * per_adapter
            )
    return {
        "model": str(model_dir),
        "layers": layers,
        "hidden": runtime.config.hidden_size,
        "batch": batch,
        "rank": rank,
        "factor_rank": factor_rank,
        "dense_max": runtime.cores.dense_max,
        "context": context,
        "repeats": repeats,
        "projections": len(runtime.linears) // layers,
        "adapters": adapters,
        "members": members,
        "adapters_made": distinct,
        "adapter_mb": per_adapter / 1e6,
        "weights_mb": weights / 1e6,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Decode-step ops and time ({result['machine']})",
        "",
        f"Model `{Path(result['model']).name}` ({result['layers']} layers, hidden {result['hidden']}, "
        f"{result['weights_mb']:.0f} MB); batch {result['batch']}, every row at position {result['context']}; "
        f"factor mixes of rank {result.get('factor_rank', result['rank'])} on all {result['projections']} projections "
        f"(the factor path's form of a merge of {result['members']} adapters); member mixes of "
        f"{result['members']} rank-{result['rank']} adapters ({result['adapter_mb']:.1f} MB each in the pool) "
        f"drawn from {result['adapters']} registered; step time = median of {result['repeats']} steps. 'vs one "
        "mix' compares with the one-mix scenario of the same pool; 'bytes allow' is that ratio if the step were "
        "bound by the bytes it reads (weights + distinct adapters). Member steps reading at most "
        f"{result.get('dense_max', 8)} distinct adapters take plain products per adapter, others the gathered ones.",
        "",
        "| scenario | mixes | adapters read | top-level aten ops / step | per layer over base | per layer over "
        "one mix | step ms | vs base | vs one mix | bytes allow |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        allow = f"{r['bytes_allow_vs_one_mix']:.3f}x" if "bytes_allow_vs_one_mix" in r else ""
        lines.append(
            f"| {r['scenario']} | {r['mixes']} | {r['adapters_read']} | {r['ops_per_step']} | "
            f"{r['ops_per_layer_over_base']:+.1f} | {r['ops_per_layer_over_one_mix']:+.1f} | {r['step_ms']:.2f} | "
            f"{r['time_vs_base']:.2f}x | {r['time_vs_one_mix']:.2f}x | {allow} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "base", help="HF model directory (default: the demo)")
    parser.add_argument("--batch", type=int, default=8, help="rows in the decode batch (default 8)")
    parser.add_argument("--mixes", type=int, default=8, help="distinct mixes in the many-mix scenario (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="rank of each random mix (default 16)")
    parser.add_argument("--context", type=int, default=32, help="tokens already in every row's KV (default 32)")
    parser.add_argument(
        "--adapters",
        type=int,
        default=64,
        help="registered adapters the many-adapter member mixes draw from (default 64)",
    )
    parser.add_argument("--members", type=int, default=3, help="adapters in each member mix (default 3)")
    parser.add_argument(
        "--factor-rank",
        dest="factor_rank",
        type=int,
        help="rank of the factor mixes (default: members x rank, the same merges as factors)",
    )
    parser.add_argument(
        "--dense-max",
        dest="dense_max",
        type=int,
        help="member steps with at most this many distinct adapters use per-adapter products (default: the pool's)",
    )
    parser.add_argument("--no-factors", dest="factors", action="store_false",
                        help="skip the factor-pool scenarios (member mixes and the base only)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per scenario (default 50)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; the server uses cores - 1)")
    parser.add_argument("--out", default="bench/results/ops-cpu", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.mixes <= args.batch:
        parser.error("--mixes must be between 1 and --batch")
    result = run(
        args.model,
        args.batch,
        args.mixes,
        args.rank,
        args.context,
        args.repeats,
        args.adapters,
        args.members,
        args.factors,
        args.factor_rank,
        args.dense_max,
    )
    write_report(args.out, result, to_markdown)


if __name__ == "__main__":
    main()
