"""The quality table (``mixserve eval``): base, single adapters, and merges in both spaces.

Rows: the base alone; each adapter alone; linear average, task arithmetic, DARE (dare_linear),
DARE-TIES, TIES at density 0.1 and at the density that scored best on the *validation* split, each in
the ``dense`` and the ``lowrank`` space; a hierarchical mix (code adapters first, then the rest);
and the seed's remedy of re-weighting the weakest task (1.2) and the strongest (0.8), chosen on the
validation split. Sweeps of TIES density and DARE drop rate (validation split) are plotted.
Every merge uses all adapters with weight 1 unless the row says otherwise.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from eval.geometry import adapter_geometry, geometry_markdown
from eval.harness import ModelUnderTest, TaskScore, evaluate
from eval.tasks import TASKS, make_split
from merging.adapters import LoraAdapter, load_adapter
from merging.merge import merge_mix
from merging.spec import parse_mix

CODE_TASKS = ("python", "pystr")
DENSITIES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _node(method: str, names: list[str], space: str, weights: dict[str, float] | None = None, **params) -> dict:
    children = [{"adapter": n, "weight": (weights or {}).get(n, 1.0)} for n in names]
    return {"method": method, "space": space, "children": children, **params}


def _summary(scores: dict[str, TaskScore]) -> dict[str, float | None]:
    code = [scores[t] for t in CODE_TASKS if t in scores]
    return {
        "sql_exec": scores["sql"].accuracy if "sql" in scores else None,
        "code_pass1": sum(s.accuracy * s.n for s in code) / max(1, sum(s.n for s in code)) if code else None,
        "python_pass1": scores["python"].accuracy if "python" in scores else None,
        "pystr_pass1": scores["pystr"].accuracy if "pystr" in scores else None,
        "json_valid": scores["json"].valid if "json" in scores else None,
        "json_exact": scores["json"].accuracy if "json" in scores else None,
    }


def _mean_task_score(s: dict[str, float | None]) -> float:
    vals = [s[k] for k in ("sql_exec", "python_pass1", "pystr_pass1", "json_exact") if s[k] is not None]
    return sum(vals) / len(vals)


class QualityBenchmark:
    def __init__(self, model_dir: Path, adapter_dirs: dict[str, Path], n_test: int, n_val: int, batch_size: int = 32):
        self.mut = ModelUnderTest(model_dir)
        self.adapters: dict[str, LoraAdapter] = {n: load_adapter(p, n) for n, p in adapter_dirs.items()}
        self.names = [t for t in TASKS if t in self.adapters] + sorted(set(self.adapters) - set(TASKS))
        tasks = [t for t in TASKS if t in self.adapters]
        self.test = {t: make_split(t, "test", n_test) for t in tasks}
        self.val = {t: make_split(t, "val", n_val) for t in tasks}
        self.batch_size = batch_size
        self.rows: list[dict] = []

    def run_row(self, label: str, mix: dict | str | None, split: str = "test", keep: bool = True) -> dict:
        merged, merge_s, method, space = None, 0.0, "-", "-"
        if mix is not None:
            spec = parse_mix(mix)
            merged = merge_mix(spec, self.adapters)
            merge_s, method, space = merged.seconds, merged.method, merged.space
        examples = self.test if split == "test" else self.val
        t0 = time.perf_counter()
        scores, ms = evaluate(self.mut, merged, examples, batch_size=self.batch_size)
        row = {
            "row": label,
            "method": method,
            "space": space,
            "mix": mix,
            **_summary(scores),
            "ms_per_token": ms,
            "merge_s": merge_s,
            "eval_s": time.perf_counter() - t0,
            "failures": {t: s.failures for t, s in scores.items() if s.failures},
        }
        print(
            f"{label:42s} sql {row['sql_exec']:.2f} code {row['code_pass1']:.2f} json {row['json_valid']:.2f}/"
            f"{row['json_exact']:.2f} {ms:.2f} ms/tok merge {merge_s * 1e3:.0f} ms",
            flush=True,
        )
        if keep:
            self.rows.append(row)
        return row

    def run(self, sweeps: bool = True) -> dict:
        names = self.names
        self.run_row("base model alone", None)
        for n in names:
            self.run_row(f"adapter {n} alone", n)
        fixed = [
            ("linear average", "linear", {}),
            ("task arithmetic", "task_arithmetic", {}),
            ("DARE (dare_linear, drop 0.5)", "dare_linear", {"drop_rate": 0.5}),
            ("DARE-TIES (drop 0.5)", "dare_ties", {"drop_rate": 0.5}),
            ("TIES (density 0.1)", "ties", {"density": 0.1}),
        ]
        for space in ("dense", "lowrank"):
            for label, method, params in fixed:
                self.run_row(f"{label} [{space}]", _node(method, names, space, **params))
        sweep = {"ties_density": {}, "dare_drop_rate": {}}
        if sweeps:
            for space in ("dense", "lowrank"):
                for d in DENSITIES:
                    r = self.run_row(
                        f"val: ties d={d} [{space}]", _node("ties", names, space, density=d), "val", keep=False
                    )
                    sweep["ties_density"].setdefault(space, []).append({"density": d, **_strip(r)})
                for p in DROP_RATES:
                    r = self.run_row(
                        f"val: dare_ties p={p} [{space}]",
                        _node("dare_ties", names, space, drop_rate=p),
                        "val",
                        keep=False,
                    )
                    sweep["dare_drop_rate"].setdefault(space, []).append({"drop_rate": p, **_strip(r)})
            for space in ("dense", "lowrank"):
                best = max(sweep["ties_density"][space], key=_mean_task_score)
                self.run_row(
                    f"TIES (best val density {best['density']}) [{space}]",
                    _node("ties", names, space, density=best["density"]),
                )
        code = [n for n in names if n in CODE_TASKS]
        rest = [n for n in names if n not in CODE_TASKS]
        if len(code) == 2:
            hier = {
                "method": "ties",
                "density": 0.5,
                "space": "dense",
                "children": [_node("linear", code, "dense"), *[{"adapter": n} for n in rest]],
            }
            # Two-adapter merges: the hierarchy's first step alone (a related pair), and an unrelated pair.
            self.run_row("code adapters only: linear(python, pystr) [dense]", _node("linear", code, "dense"))
            if {"sql", "json"} <= set(rest):
                self.run_row("two tasks only: linear(sql, json) [dense]", _node("linear", ["sql", "json"], "dense"))
            self.run_row("hierarchical: ties(linear(python, pystr), sql, json) [dense]", hier)
        # The seed's remedy: up-weight the task the linear merge serves worst, down-weight the best (val).
        val_lin = self.run_row("val: linear average [lowrank]", _node("linear", names, "lowrank"), "val", keep=False)
        per_task = {
            "sql": val_lin["sql_exec"],
            "python": val_lin["python_pass1"],
            "pystr": val_lin["pystr_pass1"],
            "json": val_lin["json_exact"],
        }
        per_task = {t: v for t, v in per_task.items() if t in names and v is not None}
        weak, strong = min(per_task, key=per_task.get), max(per_task, key=per_task.get)
        weights = {weak: 1.2, strong: 0.8}
        self.run_row(
            f"linear, weights {weak} 1.2 / {strong} 0.8 [lowrank]",
            _node("linear", names, "lowrank", weights=weights),
        )
        return {"rows": self.rows, "sweeps": sweep}


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("mix", "failures", "row")}


def to_markdown(result: dict) -> str:
    head = (
        "| row | SQL exec acc | code pass@1 (python / pystr) | JSON valid | JSON exact | ms/token | merge time |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in result["rows"]:
        merge = "-" if r["merge_s"] == 0 else f"{r['merge_s'] * 1e3:.0f} ms"
        lines.append(
            f"| {r['row']} | {r['sql_exec']:.1%} | {r['code_pass1']:.1%} ({r['python_pass1']:.0%} / {r['pystr_pass1']:.0%}) | "
            f"{r['json_valid']:.1%} | {r['json_exact']:.1%} | {r['ms_per_token']:.2f} | {merge} |"
        )
    table = head + "\n".join(lines) + "\n"
    if "geometry" not in result:
        return table
    return f"{table}\n## Adapter deltas\n\n{geometry_markdown(result['geometry'])}"


def plot_sweeps(sweeps: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, x in ((axes[0], "ties_density", "density"), (axes[1], "dare_drop_rate", "drop_rate")):
        for space, style in (("dense", "-"), ("lowrank", "--")):
            pts = sweeps.get(key, {}).get(space, [])
            if not pts:
                continue
            xs = [p[x] for p in pts]
            for metric, color in (("sql_exec", "C0"), ("code_pass1", "C1"), ("json_exact", "C2"), ("json_valid", "C3")):
                ax.plot(xs, [p[metric] for p in pts], style, color=color, marker="o", ms=3, label=f"{metric} [{space}]")
        ax.set(xlabel=x, ylabel="score (validation split)", ylim=(-0.02, 1.02))
        ax.set_title("TIES: density sweep" if key == "ties_density" else "DARE-TIES: drop-rate sweep")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_benchmark(
    model_dir: Path, adapter_dirs: dict[str, Path], out_dir: Path, *, n_test: int, n_val: int, sweeps: bool = True
) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bench = QualityBenchmark(model_dir, adapter_dirs, n_test, n_val)
    result = bench.run(sweeps=sweeps)
    result["geometry"] = adapter_geometry(bench.mut.params, bench.adapters)
    result["meta"] = {
        "model": str(model_dir),
        "adapters": {n: str(p) for n, p in adapter_dirs.items()},
        "n_test_per_task": n_test,
        "n_val_per_task": n_val,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    (out_dir / "quality.md").write_text(to_markdown(result))
    if sweeps:
        plot_sweeps(result["sweeps"], out_dir / "sweeps.png")
    return result


def _json_default(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(type(o))
