"""Accelerator benchmark: a random-weight Mistral-7B in bf16 with 8 rank-16 mixes, one script, one run.

What it measures (``bench/gpu.sh`` runs it; every figure is from this run):

1. **Copy bandwidth** of the device (a 1 GiB device-to-device copy: read + written bytes / time).
2. **bs1 decode**: one sequence (128-token prompt) decoding on one mix; the step time against the
   bandwidth bound ``weight bytes / copy bandwidth`` (target: >= 70% of the bound).
3. **32 sequences over 8 mixes vs one mix**: decode-step throughput of a 32-row batch whose rows use
   8 different rank-16 mixes, against the same batch on one mix (target: >= 0.85x).
4. **Lowrank TIES merge** of 3 rank-16 adapters over the whole 7B shape (target: < 100 ms).
5. **Member mixes** (the server's default path: adapters resident once, each mix a core over its
   members): bs1 one mix of 3 adapters against the base step (target: <= 1.10x), 32 rows over 32
   distinct mixes of 3 drawn over 64 adapters against 32 rows on one (target: within 10% of what the
   bytes allow), and the whole 7B's TIES member merge (a new adapter set, a cold mix over a known set).

``--tiny`` runs the same steps on a tiny Mistral shape (on CPU when there is no GPU) so that the script
is tested end to end in CI; its figures say nothing about a GPU, and the report says so.

    bench/gpu.sh --out bench/results/gpu-h100      # on the GPU machine
    bench/gpu.sh --tiny --out /tmp/gpu-tiny        # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import statistics
import time

import torch

from bench.report import write_report
from merging.merge import merge_mix
from merging.spec import parse_mix
from merging.synthetic import MISTRAL_7B, random_adapter

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024}  # fmt: skip
FULL = {"hidden_size": MISTRAL_7B.hidden, "intermediate_size": MISTRAL_7B.intermediate,
        "num_hidden_layers": MISTRAL_7B.layers, "num_attention_heads": MISTRAL_7B.heads,
        "num_key_value_heads": MISTRAL_7B.kv_heads, "vocab_size": MISTRAL_7B.vocab}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / seconds


def build_runtime(shape: dict, device: torch.device, dtype: torch.dtype, max_loras: int, graphs: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.worker.runtime import ModelRuntime

    config = AutoConfig.for_model("mistral", max_position_embeddings=4096, sliding_window=None,
                                  tie_word_embeddings=False, **shape)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # The KV cache for 2 x 32 sequences of 512 tokens (plus bs1's) is all these measurements need.
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * 128 * 2
    return ModelRuntime.from_model(hf, max_len=512, kv_cache_bytes=72 * 512 * per_token + (1 << 24),
                                   max_loras=max_loras, core_slots=40, adapter_slots=112,
                                   cuda_graphs=graphs)  # fmt: skip


def random_mixes(runtime, n: int, rank: int) -> list:
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        factors = {}
        for name, (o, i) in runtime.base_shapes().items():
            factors[name.removesuffix(".weight")] = (torch.randn(rank, i, generator=g) / i**0.5,
                                                      torch.randn(o, rank, generator=g) * 0.01)  # fmt: skip
        out.append(runtime.lora_to_device(factors))
    return out


def decode_rows(runtime, batch: int, prompt_len: int):
    """``batch`` sequences on the base model with ``prompt_len`` tokens in the cache."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, runtime.config.vocab_size, (prompt_len,), generator=g).tolist()
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(prompt_len + 1)) for _ in range(batch)]
    runtime.prefill([PrefillChunk(prompt, 0, t) for t in tables])
    return [DecodeRow(7, prompt_len, t) for t in tables], tables


def member_measures(runtime, device: torch.device, repeats: int, t_base: float, t_base32: float,
                    n_adapters: int = 64) -> list[dict]:  # fmt: skip
    """Lowrank mixes as member cores (the server's path): ``n_adapters`` random rank-16 adapters, 32 distinct
    TIES mixes of 3 drawn over all of them, every adapter resident in the member pool."""
    from merging.core_merge import BasisCache
    from merging.member_merge import SetFamilies, merge_members

    shapes = {name.removesuffix(".weight"): shape for name, shape in runtime.base_shapes().items()}
    # Only the adapters the mixes read are made (on the host; the pool copies them in on admission).
    g = torch.Generator().manual_seed(3)
    draws = [torch.randperm(n_adapters, generator=g)[:3].tolist() for _ in range(32)]
    adapters = {f"a{i}": random_adapter(f"a{i}", shapes, rank=16, alpha=32, seed=50 + i)
                for i in sorted({i for d in draws for i in d} | {0, 1, 2})}  # fmt: skip

    def spec(members, i: int):
        return parse_mix({"method": "ties", "density": 0.2, "children": [
            {"adapter": f"a{m}", "weight": round(0.5 + ((i * 7 + k * 3) % 11) / 10, 2)} for k, m in enumerate(members)]})  # fmt: skip

    families, bases = SetFamilies(1 << 34), BasisCache(max_bytes=1 << 34)
    first = _median_seconds(lambda: merge_members(spec([0, 1, 2], 0), adapters), device, 1, warmup=1)
    merge_members(spec([0, 1, 2], 0), adapters, families=families, bases=bases)
    cold = _median_seconds(lambda: merge_members(spec([0, 1, 2], 1), adapters, families=families, bases=bases), device,
                           max(3, repeats // 10), warmup=1)  # fmt: skip
    one_mix = runtime.members_to_device(merge_members(spec([0, 1, 2], 0), adapters), adapters)
    mixes = [runtime.members_to_device(merge_members(spec(d, i), adapters), adapters) for i, d in enumerate(draws)]
    slots = [runtime.cores.acquire(one_mix)] + [runtime.cores.acquire(m) for m in mixes]
    bs1, tables1 = decode_rows(runtime, 1, 128)
    rows32, tables = decode_rows(runtime, 32, 128)
    on = lambda rows, slot_of: [dataclasses.replace(r, core_slot=slot_of(i)) for i, r in enumerate(rows)]  # noqa: E731
    one = _median_seconds(lambda: runtime.decode(on(bs1, lambda i: slots[0])), device, repeats)
    t_one32 = _median_seconds(lambda: runtime.decode(on(rows32, lambda i: slots[0])), device, repeats)
    t_all32 = _median_seconds(lambda: runtime.decode(on(rows32, lambda i: slots[1 + i])), device, repeats)
    for t in tables + tables1:
        runtime.kv.free(t)
    distinct = len({i for d in draws for i in d})
    weights = runtime.weight_bytes
    per_adapter = runtime.cores.adapter_bytes(adapters["a0"])
    allowed = (weights + 3 * per_adapter) / (weights + distinct * per_adapter)  # one mix's step / bytes-bound step
    return [
        {"measure": "member merge (TIES, 3 rank-16 adapters), a new adapter set, whole model (ms)",
         "value": round(1e3 * first, 1), "target": "<= 100 ms on 2 CPU cores (issue 34)", "ratio": None},
        {"measure": "member merge, a cold mix over a known set, whole model (ms)", "value": round(1e3 * cold, 1),
         "target": "", "ratio": None},
        {"measure": "bs1 decode step, one member mix of 3 adapters (ms)", "value": round(1e3 * one, 3),
         "target": "<= 1.10x the base step", "ratio": round(one / t_base, 3)},
        {"measure": "32 rows decode step, one member mix (ms)", "value": round(1e3 * t_one32, 3), "target": "",
         "ratio": round(t_one32 / t_base32, 3)},
        {"measure": f"32 rows decode step, 32 distinct mixes of 3 over {n_adapters} adapters ({distinct} distinct "
                    "read) (ms)", "value": round(1e3 * t_all32, 3),
         "target": f"throughput within 10% of the bytes' bound ({allowed:.3f}x one mix's)",
         "ratio": round(t_one32 / t_all32, 3)},
    ]  # fmt: skip


def decode_measures(runtime, device: torch.device, repeats: int, bound: float) -> tuple[list[dict], list[dict]]:
    """bs1 decode against the bandwidth bound; 32 rows on 8 mixes against 32 rows on one; each with the
    default side path (masked on CUDA, grouped_mm on CPU) and, where torch has grouped_mm for the dtype,
    the other one; and the checks: the same logits with and without CUDA graphs, and the 8-mix batch
    against its rows 4 at a time (next to the base model's own batch-shape noise in bf16)."""
    slots = [runtime.pool.acquire(m) for m in random_mixes(runtime, 8, rank=16)]
    bs1, tables1 = decode_rows(runtime, 1, 128)
    rows_base, tables = decode_rows(runtime, 32, 128)
    on = lambda rows, slot_of: [dataclasses.replace(r, lora_slot=slot_of(i)) for i, r in enumerate(rows)]  # noqa: E731
    batches = {"one": on(bs1, lambda i: slots[0]), "32 one": on(rows_base, lambda i: slots[0]),
               "32 eight": on(rows_base, lambda i: slots[i // 4])}  # fmt: skip
    t_base = _median_seconds(lambda: runtime.decode(bs1), device, repeats)
    t_base32 = _median_seconds(lambda: runtime.decode(rows_base), device, repeats)
    rows = [{"measure": "bs1 decode step, base model (ms)", "value": round(1e3 * t_base, 3), "target": "",
             "ratio": round(bound / t_base, 3)},
            {"measure": "32 rows decode step, base model (ms)", "value": round(1e3 * t_base32, 3), "target": "",
             "ratio": None}]  # fmt: skip
    default = "grouped" if runtime.pool.grouped else "masked"
    # (run() decodes in bf16, which grouped_mm takes on both devices)
    other = {"grouped": "masked", "masked": "grouped"}[default]
    paths = [default] + ([other] if hasattr(torch.nn.functional, "grouped_mm") else [])
    checks: list[dict] = []
    for path in paths:
        runtime.pool.grouped = path == "grouped"
        if runtime.graphs is not None and path != default:  # graphs are captured for one side path
            runtime.graphs = type(runtime.graphs)(runtime, capture=True)
        try:  # one path failing (e.g. its graph capture) still leaves the other's figures
            rows += side_path_measures(runtime, device, repeats, bound, batches, path, t_base32)
            checks += consistency_checks(runtime, batches["32 eight"], f"8 mixes, {path}")
        except Exception as exc:  # reported in the table
            rows.append(
                {"measure": f"{path} side path", "value": f"FAILED: {exc!r}"[:300], "target": "", "ratio": None}
            )
    runtime.pool.grouped = default == "grouped"
    checks += consistency_checks(runtime, rows_base, "base model")
    for t in tables + tables1:
        runtime.kv.free(t)
    try:
        rows += member_measures(runtime, device, repeats, t_base, t_base32)
    except Exception as exc:  # reported in the table
        rows.append({"measure": "member mixes", "value": f"FAILED: {exc!r}"[:300], "target": "", "ratio": None})
    return rows, checks


def side_path_measures(runtime, device, repeats: int, bound: float, batches: dict, path: str,
                       t_base32: float) -> list[dict]:  # fmt: skip
    step = _median_seconds(lambda: runtime.decode(batches["one"]), device, repeats)
    t_one = _median_seconds(lambda: runtime.decode(batches["32 one"]), device, repeats)
    t_eight = _median_seconds(lambda: runtime.decode(batches["32 eight"]), device, repeats)
    return [
        {"measure": f"bs1 decode step, one mix, {path} side path (ms)", "value": round(1e3 * step, 3),
         "target": f">= 70% of the bound ({1e3 * bound:.3f} ms)", "ratio": round(bound / step, 3)},
        {"measure": f"32 rows decode step, one mix, {path} (ms)", "value": round(1e3 * t_one, 3), "target": "",
         "ratio": round(t_base32 / t_one, 3)},
        {"measure": f"32 rows decode step, 8 mixes, {path} (ms)", "value": round(1e3 * t_eight, 3),
         "target": ">= 0.85x one mix's throughput", "ratio": round(t_one / t_eight, 3)},
    ]  # fmt: skip


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    scale = ref.abs().max().item() or 1.0
    return {"check": name, "max_abs_diff": round((got - ref).abs().max().item(), 6), "logit_scale": round(scale, 3),
            "argmax_agree": f"{int((got.argmax(-1) == ref.argmax(-1)).sum())}/{len(ref)}"}  # fmt: skip


def consistency_checks(runtime, rows: list, label: str) -> list[dict]:
    """Logits of 32 rows (at the same positions, so each decode rewrites the same keys): graphs against
    the eager step, and the batch against its rows decoded 4 at a time (for the base model: bf16's
    batch-shape noise with no side path)."""
    checks = []
    batch = runtime.decode(rows)
    if runtime.graphs is not None:
        graphs, runtime.graphs = runtime.graphs, None
        try:
            eager = runtime.decode(rows)
        finally:
            runtime.graphs = graphs
        checks.append(_compare(f"CUDA graph step vs eager step, 32 rows, {label}", batch, eager))
    alone = torch.cat([runtime.decode(rows[i : i + 4]) for i in range(0, len(rows), 4)])
    checks.append(_compare(f"32 rows vs the same rows 4 at a time, {label}", batch, alone))
    return checks


def merge_measures(shapes: dict, device: torch.device, repeats: int, profile: bool) -> list[dict]:
    """Lowrank TIES of 3 rank-16 adapters over every module, on the device and (next to a GPU) on the
    CPU with every core; on CUDA the profile of one merge is printed."""
    out = []
    places = [("device", device)] + ([(f"CPU ({torch.get_num_threads()} threads)", torch.device("cpu"))]
                                     if device.type != "cpu" else [])  # fmt: skip
    for label, where in places:
        adapters = {f"a{i}": random_adapter(f"a{i}", shapes, rank=16, alpha=32, seed=i, device=where) for i in range(3)}
        spec = parse_mix({"method": "ties", "density": 0.2, "space": "lowrank",
                          "children": [{"adapter": a} for a in adapters]})  # fmt: skip
        merge = functools.partial(merge_mix, spec, adapters)
        seconds = _median_seconds(merge, where, max(3, repeats // 10), warmup=1)
        if profile and where.type == "cuda":
            _print_profile(merge)
        out.append({"measure": f"lowrank TIES merge, 3 adapters, whole model, {label} (ms)",
                    "value": round(1e3 * seconds, 1), "target": "< 100 ms", "ratio": None})  # fmt: skip
    return out


def _print_profile(fn) -> None:
    """The merge's top operators by device and by host time (printed: where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40), flush=True)


def run(tiny: bool, repeats: int, graphs: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    shape = TINY if tiny else FULL
    t0 = time.perf_counter()
    bandwidth = copy_bandwidth(device, (1 << 30) if not tiny else (1 << 24))
    runtime = build_runtime(shape, device, dtype, max_loras=8, graphs=graphs)
    weight_bytes = runtime.weight_bytes
    rows, checks = decode_measures(runtime, device, repeats, weight_bytes / bandwidth)
    del runtime  # free the model before the merges
    shapes = MISTRAL_7B.module_shapes(layers=shape["num_hidden_layers"]) if not tiny else _tiny_module_shapes(shape)
    rows += merge_measures(shapes, device, repeats, profile=not tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU (no GPU)"
    return {
        "device": name,
        "gpu_measured": device.type == "cuda" and not tiny,
        "shape": "tiny Mistral (--tiny)" if tiny else "Mistral-7B (random weights)",
        "dtype": "bfloat16",
        "cuda_graphs": graphs and device.type == "cuda",
        "torch": torch.__version__,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "rows": rows,
        "checks": checks,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _tiny_module_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
    return {f"model.layers.{n}.{p}": s for n in range(shape["num_hidden_layers"]) for p, s in per.items()}


def to_markdown(result: dict) -> str:
    lines = [f"# Accelerator benchmark: {result['device']}", ""]
    if not result["gpu_measured"]:
        lines += ["**GPU figures not measured**: this run used " + result["shape"] + " on " + result["device"]
                  + "; it only shows the script runs end to end.", ""]  # fmt: skip
    lines += [f"{result['shape']}, {result['dtype']}, CUDA graphs {'on' if result['cuda_graphs'] else 'off'}, "
              f"torch {result['torch']}; weights {result['weight_bytes'] / 2**30:.2f} GiB; device copy bandwidth "
              f"{result['copy_bandwidth_gb_s']} GB/s; whole run {result['seconds']} s.", "",
              "| measure | value | ratio | target |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['measure']} | {r['value']} | {'' if r['ratio'] is None else r['ratio']} | {r['target']} |"
              for r in result["rows"]]  # fmt: skip
    lines += ["", "Ratios: bs1 rows, the bandwidth bound / the step; 32-row one mix, base / one mix (step time);"
              " 8 mixes, one mix / 8 mixes (throughput).", "",
              "| check (bf16 logits) | max abs diff | largest logit | argmax agree |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['check']} | {c['max_abs_diff']} | {c['logit_scale']} | {c['argmax_agree']} |"
              for c in result.get("checks", [])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny Mistral shape (runs on CPU; for tests)")
    ap.add_argument("--repeats", type=int, default=50, help="timed steps per measure (default 50)")
    ap.add_argument("--no-cuda-graphs", dest="graphs", action="store_false", help="decode without CUDA graphs")
    ap.add_argument("--out", default="bench/results/gpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    result = run(args.tiny, args.repeats, args.graphs)
    write_report(args.out, result, to_markdown)


if __name__ == "__main__":
    main()
