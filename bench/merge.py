"""Merge benchmark: PEFT merge_utils (baseline) vs mixserve dense vs mixserve lowrank, one run.

Mistral-7B shapes (hidden 4096, intermediate 14336, kv 1024, the 7 linear modules per layer), N random
rank-16 adapters, methods linear / ties / dare_ties. Every implementation starts from the adapters'
factors, so forming ``dW_i = scale * B @ A`` is inside every timing. ``--layers N`` merges N layers
and extrapolates linearly to the model's 32 (each layer is the same work); on a GPU use
``--layers 32 --device cuda`` to run the whole model.

    python -m bench.merge --layers 1 --out bench/results/merge-cpu

Writes ``<out>.json`` and ``<out>.md``. Timings are ratios against the PEFT baseline measured in the
same run; errors are relative Frobenius distances summed over all merged modules.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from bench.report import write_report
from merging.adapters import LoraAdapter
from merging.merge import merge_mix
from merging.spec import parse_mix
from merging.synthetic import MISTRAL_7B, random_adapter

METHODS = {
    "linear": {},
    "ties": {"density": 0.1},
    "dare_ties": {"drop_rate": 0.5},
}
# Methods PEFT does not have: timed in the lowrank space only (--lowrank-only). Their dense
# reference needs full SVDs of every 4096 x 14336 task matrix (minutes per layer on a CPU); that the
# spectral ones give the same result in both spaces is tested on small shapes (tests/test_spectral.py).
NEW_METHODS = {
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
    "della": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous result before the next run
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def peft_merge(method: str, params: dict, adapters: list[LoraAdapter], weights: list[float]) -> dict[str, torch.Tensor]:
    """The baseline: PEFT's merge_utils on the dense task vectors, module by module."""
    from peft.utils import merge_utils

    w = torch.tensor(weights, device=next(iter(adapters[0].modules.values())).A.device)
    out = {}
    for module in adapters[0].modules:
        tensors = [a.modules[module].dense() for a in adapters]
        if method == "linear":
            out[module] = merge_utils.task_arithmetic(tensors, w / w.sum())
        elif method == "ties":
            out[module] = merge_utils.ties(tensors, w, params["density"], "total")
        elif method == "dare_ties":
            out[module] = merge_utils.dare_ties(tensors, w, 1.0 - params["drop_rate"], "total")
        else:
            raise ValueError(method)
    return out


def entries_differing(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> int:
    """Entries that differ by more than rounding (1e-6 of the module's largest entry)."""
    return sum(int(((actual[m] - reference[m]).abs() > 1e-6 * reference[m].abs().max()).sum()) for m in reference)


def rel_error(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    num = sum(float((actual[m].float() - reference[m].float()).pow(2).sum()) for m in reference)
    den = sum(float(reference[m].float().pow(2).sum()) for m in reference)
    return (num / den) ** 0.5 if den > 0 else 0.0


def _warm_up(device: torch.device, methods: list[str]) -> None:
    """Run every path once on tiny shapes so lazy library set-up is not timed."""
    tiny = [random_adapter(f"w{i}", {"m": (64, 48)}, rank=4, seed=i, device=device) for i in range(2)]
    for method in methods:
        peft_merge(method, METHODS[method], tiny, [1.0, 1.0])
        for space in ("dense", "lowrank"):
            spec = parse_mix(
                {
                    "method": method,
                    "space": space,
                    **METHODS[method],
                    "children": [{"adapter": "w0"}, {"adapter": "w1"}],
                }
            )
            merge_mix(spec, {a.name: a for a in tiny})


def run_lowrank_only(layers: int, n_adapters: int, rank: int, device: torch.device, repeats: int,
                     methods: list[str]) -> dict:  # fmt: skip
    """Lowrank merge time (extrapolated to 32 layers), rank, size and distance to task arithmetic."""
    shapes = MISTRAL_7B.module_shapes(layers=layers)
    adapters = [
        random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=i, device=device) for i in range(n_adapters)
    ]
    by_name = {a.name: a for a in adapters}
    weights = [1.0 + 0.25 * i for i in range(n_adapters)]
    children = [{"adapter": a.name, "weight": w} for a, w in zip(adapters, weights, strict=True)]
    scale = MISTRAL_7B.layers / layers
    tiny = {
        a.name: a for a in (random_adapter(f"w{i}", {"m": (64, 48)}, rank=4, seed=i, device=device) for i in range(2))
    }
    plain = merge_mix(parse_mix({"method": "task_arithmetic", "space": "lowrank", "children": children}), by_name)
    plain_w = {m: d.dense() for m, d in plain.modules.items()}
    rows = []
    for method in methods:
        params = {**NEW_METHODS, **METHODS}.get(method, {})
        merge_mix(parse_mix({"method": method, "space": "lowrank", **params,
                             "children": [{"adapter": "w0"}, {"adapter": "w1"}]}), tiny)  # warm-up  # fmt: skip
        spec = parse_mix({"method": method, "space": "lowrank", **params, "children": children})
        t_low, low = _timed(lambda s=spec: merge_mix(s, by_name), device, repeats)
        low_w = {m: d.dense() for m, d in low.modules.items()}
        row = {"method": method, "params": params, "lowrank_s": t_low * scale,
               "lowrank_rank": max(d.rank for d in low.modules.values()), "lowrank_mb": low.nbytes / 1e6 * scale,
               "lowrank_vs_task_arithmetic": rel_error(low_w, plain_w)}  # fmt: skip
        rows.append(row)
        print(f"{method:12s} lowrank {row['lowrank_s']:.2f} s (whole 7B)  rank {row['lowrank_rank']}", flush=True)
        del low, low_w
    return {"mode": "lowrank-only", "shape": "Mistral-7B (hidden 4096, intermediate 14336, kv 1024, 7 linear modules/layer)",
            "layers_run": layers, "extrapolated_to_layers": MISTRAL_7B.layers, "adapters": n_adapters, "rank": rank,
            "weights": weights, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__, "rows": rows}  # fmt: skip


def method_label(row: dict) -> str:
    """``method (param value, ...)`` for a table row."""
    p = ", ".join(f"{k} {v}" for k, v in row["params"].items())
    return f"{row['method']} ({p})" if p else row["method"]


def lowrank_only_markdown(result: dict) -> str:
    lines = [
        f"Mistral-7B shapes, {result['adapters']} random rank-{result['rank']} adapters (weights "
        f"{', '.join(map(str, result['weights']))}), all 7 linear modules; {result['layers_run']} layer(s) run on "
        f"{result['device']} ({result['device_name']}, {result['threads']} threads), times extrapolated to "
        f"{result['extrapolated_to_layers']} layers; median of {result['repeats']}. Lowrank space only (see bench/merge.py).",
        "",
        "| method | mixserve lowrank, whole 7B | merged rank | merged size | distance to task arithmetic |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = method_label(r)
        lines.append(f"| {name} | {r['lowrank_s']:.2f} s | {r['lowrank_rank']} | {r['lowrank_mb']:.0f} MB | "
                     f"{r['lowrank_vs_task_arithmetic']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


CORE_METHODS = {"ties": {"density": 0.1}, "dare_ties": {"drop_rate": 0.5}, "linear": {}, "tsv": {}, "iso_c": {},
                "della": {"density": 0.5}}  # fmt: skip


def run_core(layers: int, n_adapters: int, family_size: int, rank: int, repeats: int, methods: list[str]) -> dict:
    """Merges on the adapter family's coordinates (what the server does for a registered family) against
    ``merge_mix`` in the lowrank space, over ``layers`` layers (32: the whole model, no extrapolation).

    Registration: the family's bases, one adapter at a time. Per method, the first mix over an adapter set
    (its bases computed) and cold mixes over the known set (other weights: the bases cached), the
    cores' size in bf16 against the lowrank factors', and the distance between the two results.
    """
    from merging.core_merge import BasisCache, merge_core
    from merging.family import AdapterFamily

    shapes = MISTRAL_7B.module_shapes(layers=layers)
    adapters = [random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=i) for i in range(family_size)]
    by_name = {a.name: a for a in adapters}
    family, register_s = AdapterFamily(), []
    for a in adapters:
        t0 = time.perf_counter()
        family = family.extend(a)
        register_s.append(time.perf_counter() - t0)
        print(f"registered {a.name}: {register_s[-1]:.2f} s", flush=True)
    names = [a.name for a in adapters[:n_adapters]]
    rows = []
    for method in methods:
        params = CORE_METHODS.get(method, {**NEW_METHODS, **METHODS}.get(method, {}))

        def spec(i: int, method=method, params=params):
            weights = [round(1.0 + 0.25 * k + 0.01 * i, 3) for k in range(len(names))]
            return parse_mix({"method": method, "space": "lowrank", **params,
                              "children": [{"adapter": n, "weight": w} for n, w in zip(names, weights, strict=True)]})  # fmt: skip

        bases = BasisCache(max_bytes=1 << 34)
        t0 = time.perf_counter()
        merge_core(spec(0), family, bases=bases)
        first = time.perf_counter() - t0
        cold = []
        for i in range(1, repeats + 1):  # new weights each time: nothing but the set's bases is reused
            t0 = time.perf_counter()
            core = merge_core(spec(i), family, bases=bases)
            cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        low = merge_mix(spec(repeats), by_name)
        t_low = time.perf_counter() - t0
        num = den = 0.0  # module by module: the whole model's dense deltas would not fit in memory
        for m, C in core.cores.items():
            ref = low.modules[m].dense()
            basis = family.bases[m]  # float64 (the cores float32)
            num += float(((basis.U @ C.to(basis.U.dtype) @ basis.V.mT).to(ref.dtype) - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        row = {"method": method, "params": params, "first_set_ms": 1e3 * first, "cold_ms": 1e3 * statistics.median(cold),
               "merge_mix_lowrank_ms": 1e3 * t_low, "speedup": t_low / statistics.median(cold),
               "core_mb_bf16": sum(c.numel() for c in core.cores.values()) * 2 / 1e6,
               "factors_mb_bf16": sum(d.A.numel() + d.B.numel() for d in low.modules.values()) * 2 / 1e6,
               "rel_err_vs_merge_mix": (num / den) ** 0.5}  # fmt: skip
        rows.append(row)
        print(f"{method:10s} first set {row['first_set_ms']:.0f} ms, cold {row['cold_ms']:.1f} ms, merge_mix "
              f"{row['merge_mix_lowrank_ms']:.0f} ms, cores {row['core_mb_bf16']:.2f} MB, err {row['rel_err_vs_merge_mix']:.1e}",
              flush=True)  # fmt: skip
        del low, core
    return {"mode": "core", "shape": "Mistral-7B (hidden 4096, intermediate 14336, kv 1024, 7 linear modules/layer)",
            "layers_run": layers, "family": family_size, "adapters": n_adapters, "rank": rank,
            "register_s": register_s, "family_rank": family.rank, "family_mb": family.nbytes / 1e6,
            "family_dtype": str(next(iter(family.bases.values())).U.dtype).removeprefix("torch."),
            "device": "cpu", "device_name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__, "rows": rows}  # fmt: skip


def run_members(layers: int, n_adapters: int, rank: int, repeats: int, methods: list[str]) -> dict:
    """Member merges (what the server does for every lowrank mix): the mix's own adapters' set family and
    a core over their factors, against ``merge_mix`` in the lowrank space, over ``layers`` layers.

    Per method: mixes over a new adapter set (nothing cached: the set's coordinates, bases and maps
    computed), and cold mixes over a known set (other weights: the set's family and bases cached), the
    cores' bytes in bf16 and the distance to ``merge_mix``'s result.
    """
    from merging.core_merge import BasisCache
    from merging.member_merge import SetFamilies, merge_members, stacked_factors

    shapes = MISTRAL_7B.module_shapes(layers=layers)
    adapters = {f"a{i}": random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=i) for i in range(n_adapters)}
    names = list(adapters)
    rows = []
    for method in methods:
        params = CORE_METHODS.get(method, {**NEW_METHODS, **METHODS}.get(method, {}))

        def spec(i: int, method=method, params=params):
            weights = [round(1.0 + 0.25 * k + 0.01 * i, 3) for k in range(len(names))]
            return parse_mix({"method": method, "space": "lowrank", **params,
                              "children": [{"adapter": n, "weight": w} for n, w in zip(names, weights, strict=True)]})  # fmt: skip

        new = []
        for i in range(max(3, repeats)):  # a new set each time: every cache empty
            t0 = time.perf_counter()
            merge_members(spec(i), adapters, families=SetFamilies(), bases=BasisCache())
            new.append(time.perf_counter() - t0)
        families, bases = SetFamilies(), BasisCache()
        merge_members(spec(0), adapters, families=families, bases=bases)
        cold = []
        for i in range(1, repeats + 1):  # new weights each time: nothing but the set's family and bases is reused
            t0 = time.perf_counter()
            mix = merge_members(spec(i), adapters, families=families, bases=bases)
            cold.append(time.perf_counter() - t0)
        low = merge_mix(spec(repeats), adapters)
        own = [adapters[n] for n in mix.members]
        num = den = 0.0  # module by module: the whole model's dense deltas would not fit in memory
        for m, C in mix.cores.items():
            ref = low.modules[m].dense()
            B_cat, A_cat = stacked_factors(own, m, torch.float64)
            num += float(((B_cat @ C.double() @ A_cat).float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        row = {"method": method, "params": params, "new_set_ms": 1e3 * statistics.median(new),
               "cold_ms": 1e3 * statistics.median(cold), "core_mb_bf16": sum(c.numel() for c in mix.cores.values()) * 2 / 1e6,
               "factors_mb_bf16": sum(d.A.numel() + d.B.numel() for d in low.modules.values()) * 2 / 1e6,
               "rel_err_vs_merge_mix": (num / den) ** 0.5}  # fmt: skip
        rows.append(row)
        print(f"{method:10s} new set {row['new_set_ms']:.0f} ms, known set {row['cold_ms']:.1f} ms, cores "
              f"{row['core_mb_bf16']:.2f} MB, err {row['rel_err_vs_merge_mix']:.1e}", flush=True)  # fmt: skip
        del low, mix
    return {"mode": "members", "shape": "Mistral-7B (hidden 4096, intermediate 14336, kv 1024, 7 linear modules/layer)",
            "layers_run": layers, "adapters": n_adapters, "rank": rank, "device": "cpu",
            "device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "repeats": repeats, "torch": torch.__version__, "rows": rows}  # fmt: skip


def members_markdown(result: dict) -> str:
    lines = [
        f"Member merges (the server's path for every lowrank mix), Mistral-7B shapes, {result['layers_run']} layers "
        f"(no extrapolation), mixes of {result['adapters']} random rank-{result['rank']} adapters; "
        f"{result['device_name']}, {result['threads']} threads, torch {result['torch']}. New set: every cache empty "
        f"(median of {max(3, result['repeats'])}); known set: new weights over a set merged before (median of "
        f"{result['repeats']}).",
        "",
        "| method | new adapter set | known set | cores, bf16 | lowrank factors, bf16 | vs merge_mix rel. err |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = method_label(r)
        lines.append(f"| {name} | {r['new_set_ms']:.0f} ms | {r['cold_ms']:.1f} ms | {r['core_mb_bf16']:.2f} MB | "
                     f"{r['factors_mb_bf16']:.0f} MB | {r['rel_err_vs_merge_mix']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def core_markdown(result: dict) -> str:
    reg = result["register_s"]
    lines = [
        f"Mistral-7B shapes, {result['layers_run']} layers (no extrapolation), a family of {result['family']} random "
        f"rank-{result['rank']} adapters (bases rank {result['family_rank']}, {result['family_mb']:.0f} MB in "
        f"{result.get('family_dtype', 'float32')}); "
        f"mixes of {result['adapters']} of them; {result['device_name']}, {result['threads']} threads, torch "
        f"{result['torch']}. Registration (the family's bases, one adapter at a time): "
        f"{', '.join(f'{s:.2f} s' for s in reg)}. Cold mixes: the median of {result['repeats']}, each with new weights.",
        "",
        "| method | first mix of an adapter set (bases computed) | cold mix over a known set | merge_mix lowrank "
        "(the factor path) | speed-up | cores, bf16 | lowrank factors, bf16 | core vs merge_mix rel. err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = method_label(r)
        lines.append(f"| {name} | {r['first_set_ms']:.0f} ms | {r['cold_ms']:.1f} ms | {r['merge_mix_lowrank_ms']:.0f} ms | "
                     f"{r['speedup']:.0f}x | {r['core_mb_bf16']:.2f} MB | {r['factors_mb_bf16']:.0f} MB | "
                     f"{r['rel_err_vs_merge_mix']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(layers: int, n_adapters: int, rank: int, device: torch.device, repeats: int, methods: list[str]) -> dict:
    shapes = MISTRAL_7B.module_shapes(layers=layers)
    adapters = [
        random_adapter(f"a{i}", shapes, rank=rank, alpha=2 * rank, seed=i, device=device) for i in range(n_adapters)
    ]
    by_name = {a.name: a for a in adapters}
    _warm_up(device, methods)
    weights = [1.0 + 0.25 * i for i in range(n_adapters)]
    scale = MISTRAL_7B.layers / layers
    rows = []
    children = [{"adapter": a.name, "weight": w} for a, w in zip(adapters, weights, strict=True)]
    # Context for the errors: how far each result is from the plain weighted sum of the task vectors.
    plain = merge_mix(parse_mix({"method": "task_arithmetic", "space": "lowrank", "children": children}), by_name)
    plain_w = {m: d.dense() for m, d in plain.modules.items()}
    del plain
    for method in methods:
        params = METHODS[method]
        specs = {
            space: parse_mix({"method": method, "space": space, **params, "children": children})
            for space in ("dense", "lowrank")
        }
        t_peft, ref = _timed(lambda m=method, p=params: peft_merge(m, p, adapters, weights), device, repeats)
        t_dense, dense = _timed(lambda s=specs["dense"]: merge_mix(s, by_name), device, repeats)
        dense_w = {m: d.dense() for m, d in dense.modules.items()}
        # What serving the exact dense result costs: re-factor it to the low-rank path's rank.
        t_svd, refactored = _timed(lambda d=dense: d.to_lowrank(), device, repeats)
        svd_w = {m: d.dense() for m, d in refactored.modules.items()}
        del refactored
        t_low, low = _timed(lambda s=specs["lowrank"]: merge_mix(s, by_name), device, repeats)
        low_w = {m: d.dense() for m, d in low.modules.items()}
        row = {
            "method": method,
            "params": params,
            "peft_s": t_peft * scale,
            "dense_s": t_dense * scale,
            "lowrank_s": t_low * scale,
            "dense_speedup": t_peft / t_dense,
            "lowrank_speedup": t_peft / t_low,
            # DARE draws its own masks in each implementation: only the deterministic methods compare.
            "dense_vs_peft_rel_err": None if method.startswith("dare") else rel_error(dense_w, ref),
            "dense_vs_peft_entries_differing": None if method.startswith("dare") else entries_differing(dense_w, ref),
            "entries": sum(t.numel() for t in ref.values()),
            "lowrank_vs_dense_rel_err": rel_error(low_w, dense_w),
            "dense_svd_s": t_svd * scale,
            "dense_svd_vs_dense_rel_err": rel_error(svd_w, dense_w),
            "dense_vs_task_arithmetic": rel_error(dense_w, plain_w),
            "lowrank_vs_task_arithmetic": rel_error(low_w, plain_w),
            "lowrank_rank": max(d.rank for d in low.modules.values()),
            "lowrank_mb": low.nbytes / 1e6 * scale,
        }
        rows.append(row)
        print(
            f"{method:10s} peft {row['peft_s']:8.2f}s  dense {row['dense_s']:8.2f}s ({row['dense_speedup']:.1f}x)  "
            f"lowrank {row['lowrank_s'] * 1e3:8.1f}ms ({row['lowrank_speedup']:.0f}x)  "
            f"err lowrank/dense {row['lowrank_vs_dense_rel_err']:.3g}",
            flush=True,
        )
        del ref, dense, dense_w, low, low_w, svd_w
    return {
        "shape": "Mistral-7B (hidden 4096, intermediate 14336, kv 1024, 7 linear modules/layer)",
        "layers_run": layers,
        "extrapolated_to_layers": MISTRAL_7B.layers,
        "adapters": n_adapters,
        "rank": rank,
        "weights": weights,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "torch": torch.__version__,
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"Mistral-7B shapes, {result['adapters']} random rank-{result['rank']} adapters, all 7 linear modules; "
        f"{result['layers_run']} layer(s) run on {result['device']} ({result['device_name']}, {result['threads']} threads), "
        f"times extrapolated to {result['extrapolated_to_layers']} layers; median of {result['repeats']}.",
        "",
        "| method | PEFT merge_utils (baseline) | mixserve dense | dense speed-up | mixserve lowrank | lowrank speed-up "
        "| dense vs PEFT rel. err (entries differing) | lowrank vs dense rel. err "
        "| distance to task arithmetic: dense / lowrank | lowrank rank | dense + SVD to that rank: time, rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = method_label(r)
        err = (
            "n/a (own masks)"
            if r["dense_vs_peft_rel_err"] is None
            else f"{r['dense_vs_peft_rel_err']:.1e} ({r['dense_vs_peft_entries_differing']} of {r['entries'] / 1e6:.0f}M entries)"
        )
        lines.append(
            f"| {name} | {r['peft_s']:.2f} s | {r['dense_s']:.2f} s | {r['dense_speedup']:.1f}x | "
            f"{r['lowrank_s'] * 1e3:.1f} ms | {r['lowrank_speedup']:.0f}x | {err} | {r['lowrank_vs_dense_rel_err']:.3f} | "
            f"{r['dense_vs_task_arithmetic']:.3f} / {r['lowrank_vs_task_arithmetic']:.3f} | {r['lowrank_rank']} | "
            f"+{r['dense_svd_s']:.1f} s, {r['dense_svd_vs_dense_rel_err']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="layers to merge (extrapolated to 32); default 1")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (median)")
    parser.add_argument("--methods", help=f"comma-separated (default: {','.join(METHODS)}; with --lowrank-only: "
                        f"{','.join(NEW_METHODS)})")  # fmt: skip
    parser.add_argument("--lowrank-only", dest="lowrank_only", action="store_true",
                        help="time only the lowrank space (for methods PEFT does not have)")  # fmt: skip
    parser.add_argument("--core", action="store_true",
                        help="merges on the adapter family's coordinates (the server's path) vs merge_mix lowrank; "
                        "--layers 32 runs the whole model")  # fmt: skip
    parser.add_argument("--family", type=int, default=4, help="--core: adapters in the family (default 4)")
    parser.add_argument("--members", action="store_true",
                        help="member merges (the server's path for every lowrank mix) over a new and a known adapter "
                        "set vs merge_mix lowrank; --layers 32 runs the whole model")  # fmt: skip
    parser.add_argument("--out", default="bench/results/merge", help="output path without extension")
    args = parser.parse_args(argv)
    if args.members:
        methods = args.methods.split(",") if args.methods else list(CORE_METHODS)
        write_report(
            args.out, run_members(args.layers, args.adapters, args.rank, args.repeats, methods), members_markdown
        )
        return 0
    if args.core:
        methods = args.methods.split(",") if args.methods else list(CORE_METHODS)
        result = run_core(args.layers, args.adapters, args.family, args.rank, args.repeats, methods)
        write_report(args.out, result, core_markdown)
        return 0
    if args.lowrank_only:
        methods = args.methods.split(",") if args.methods else list(NEW_METHODS)
        result = run_lowrank_only(
            args.layers, args.adapters, args.rank, torch.device(args.device), args.repeats, methods
        )
        write_report(args.out, result, lowrank_only_markdown)
        return 0
    methods = args.methods.split(",") if args.methods else list(METHODS)
    result = run(args.layers, args.adapters, args.rank, torch.device(args.device), args.repeats, methods)
    write_report(args.out, result, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
