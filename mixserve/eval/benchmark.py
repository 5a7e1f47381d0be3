"""The quality table (``mixserve eval``): what each merge keeps of every adapter's skill.

Rows (test split), every merge with weight 1 per adapter unless the row says otherwise:

- the base alone and each adapter alone: the single adapters' scores are the reference of the
  *normalized retention* of every merge row, per task ``merged score / single score`` and their mean
  (the normalized accuracy of the TIES paper, Yadav et al. 2023, arXiv:2306.01708);
- all adapters merged, in the ``dense`` and the ``lowrank`` space: linear average, task arithmetic
  (lambda 1), TIES at the paper's default density 0.2, DARE (dare_linear) and DARE-TIES at drop 0.5,
  TSV-M, Iso-C, Iso-CTS, DELLA and Breadcrumbs at their defaults, and the tuned rows: task arithmetic's scaling lambda, TIES' density and lambda, DARE-TIES' drop rate, DELLA's density,
  each chosen on the *validation* split (``tune_space``);
- the same four adapters merged by PEFT's ``add_weighted_adapter`` (``peft_rows.py``) with the tuned
  TIES row's hyper-parameters: what users would otherwise run;
- pairs (sql + json, python + pystr, sql + python), scored on their own tasks;
- a hierarchical mix (the code adapters first, then the rest), and the recommended mix: the
  all-adapter candidate of the validation split that keeps the most of its worst task (up to
  ``KEEP_EVERY_TASK``), then the best mean, scored as the server serves it (low-rank factors).

Every merge is made as ``mixserve serve`` makes it: lowrank mixes as cores over their members' factors
(``merging/member_merge.py``, what the server caches and serves), dense-space ones by ``merge_mix``.

Nothing is chosen on the test split: it is scored once per row.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merging.adapters import LoraAdapter, load_adapter
from merging.core_merge import dense_node
from merging.delta import MergedDelta
from merging.member_merge import merge_members
from merging.merge import merge_mix
from merging.spec import parse_mix
from mixserve.eval.geometry import adapter_geometry
from mixserve.eval.harness import ModelUnderTest, evaluate
from mixserve.eval.intervals import (
    interval,
    row_intervals,
    separated,
    split_weights,
)
from mixserve.eval.latency import ServingLatency
from mixserve.eval.report import plot_results, to_markdown
from mixserve.eval.scorers import TaskScore
from mixserve.eval.tasks import TASKS, held_out_unit, make_split
from mixserve.eval.tune import KEEP_EVERY_TASK

CODE_TASKS = ("python", "pystr")
PAIRS = (("sql", "json"), ("python", "pystr"), ("sql", "python"))


@dataclass(frozen=True)
class SearchGrid:
    """The validation grids. Linear average = task arithmetic at lambda 1/n: the lambda grid starts below it."""

    ta_lambdas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    ties_densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_lambdas: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5, 2.0)  # at the best density; lambda 1 is in its row
    dare_drop_rates: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    della_densities: tuple[float, ...] = (0.3, 0.5, 0.7)  # at the paper's epsilon 0.15


SMOKE_GRID = SearchGrid((1.0,), (0.5,), (1.5,), (0.5,), (0.5,))  # for tests: every code path, few rows


def mix_node(method: str, names: list[str], space: str, *, weight: float = 1.0, **params) -> dict:
    """A one-level mix of ``names`` (weight 1 each); ``weight`` is the node's scale (lambda)."""
    node = {"method": method, "space": space, "children": [{"adapter": n} for n in names], **params}
    return node if weight == 1.0 else {**node, "weight": weight}


def task_scores(scores: dict[str, TaskScore]) -> dict[str, float]:
    """Each task's headline score: SQL execution accuracy, pass@1, JSON exact match."""
    return {t: s.accuracy for t, s in scores.items()}


def retention(scores: dict[str, float], reference: dict[str, float]) -> dict[str, float | None]:
    """Per task ``score / reference`` (``None`` where the single adapter scores 0: nothing to keep)."""
    return {t: (scores[t] / reference[t] if reference.get(t) else None) for t in scores}


def mean_retention(ret: dict[str, float | None]) -> float:
    vals = [v for v in ret.values() if v is not None]
    return sum(vals) / len(vals) if vals else 0.0


def _objective(row: dict) -> tuple[float, float]:
    """What the validation search maximises: mean normalized retention, then the worst task's."""
    vals = [v for v in row["retention"].values() if v is not None]
    return (mean_retention(row["retention"]), min(vals, default=0.0))


def _recommend_key(row: dict) -> tuple[float, float]:
    """How the recommended mix is chosen on the validation split: the worst task's retention up to
    ``KEEP_EVERY_TASK`` first (a mix that drops one skill is no all-tasks mix, whatever its mean),
    then the mean among the mixes that reach it."""
    mean, worst = _objective(row)
    return (min(worst, KEEP_EVERY_TASK), mean)


class QualityBenchmark:
    """One base model in memory, the adapters loaded once, the task splits drawn once."""

    def __init__(
        self,
        model_dir: Path,
        adapter_dirs: dict[str, Path],
        n_test: int,
        n_val: int,
        batch_size: int = 32,
        grid: SearchGrid | None = None,
        latency: tuple[int, int] = (24, 5),
    ) -> None:
        """``latency``: decode steps and rounds of each row's serving-path timing (``latency.py``)."""
        self.grid = grid or SearchGrid()
        self.model_dir, self.adapter_dirs = Path(model_dir), dict(adapter_dirs)
        self.mut = ModelUnderTest(model_dir)
        self.adapters: dict[str, LoraAdapter] = {n: load_adapter(p, n) for n, p in adapter_dirs.items()}
        self.names = [t for t in TASKS if t in self.adapters] + sorted(set(self.adapters) - set(TASKS))
        self.tasks = [t for t in TASKS if t in self.adapters]
        self.splits = {
            "test": {t: make_split(t, "test", n_test) for t in self.tasks},
            "val": {t: make_split(t, "val", n_val) for t in self.tasks},
        }
        self.units = {split: {t: [held_out_unit(e, i) for i, e in enumerate(exs)] for t, exs in by_task.items()}
                      for split, by_task in self.splits.items()}  # fmt: skip
        self.latency = ServingLatency(self.model_dir, self.adapters, steps=latency[0], rounds=latency[1])
        self.batch_size = batch_size
        self.reference: dict[str, dict[str, float]] = {"test": {}, "val": {}}
        self.reference_correct: dict[str, dict[str, str]] = {"test": {}, "val": {}}
        self.rows: list[dict] = []
        self.search: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------------------------------ rows
    def merge(self, mix: dict | str) -> MergedDelta:
        """The merge as ``mixserve serve`` makes it: lowrank mixes as cores over their members' factors
        (``merge_members``), the rest (dense-space nodes) with ``merge_mix``."""
        spec = parse_mix(mix)
        if not dense_node(spec):
            return merge_members(spec, self.adapters).to_merged(self.adapters)
        return merge_mix(spec, self.adapters)

    def run_row(
        self,
        label: str,
        group: str,
        mix: dict | str | None,
        *,
        split: str = "test",
        tasks: list[str] | None = None,
        merged: MergedDelta | None = None,
        keep: bool = True,
        timing: bool = True,
    ) -> dict:
        """Score one model (base, adapter, merge, or a given ``merged`` delta) on ``tasks`` of ``split``."""
        if merged is None and mix is not None:
            merged = self.merge(mix)
        tasks = tasks or self.tasks
        examples = {t: self.splits[split][t] for t in tasks}
        t0 = time.perf_counter()
        scores = evaluate(self.mut, merged, examples, batch_size=self.batch_size)
        eval_s = time.perf_counter() - t0
        ms = base_ms = None
        if timing:  # through the serving path, against the base in the same run (latency.py)
            ms, base_ms = self.latency.measure(self.latency.prepare(mix, merged))
        headline = task_scores(scores)
        ret = retention(headline, self.reference[split]) if group not in ("base", "single") else {}
        row = {
            "row": label,
            "group": group,
            "split": split,
            "method": merged.method if merged is not None else "-",
            "space": merged.space if merged is not None else "-",
            "mix": mix,
            "scores": headline,
            "json_valid": scores["json"].valid if "json" in scores else None,
            "retention": ret,
            "mean_retention": mean_retention(ret) if ret else None,
            "ms_per_token": ms,
            "ms_vs_base": ms / base_ms if ms is not None else None,
            "merge_s": merged.seconds if merged is not None else 0.0,
            "eval_s": eval_s,
            "failures": {t: s.failures for t, s in scores.items() if s.failures},
            "correct": {t: s.correct for t, s in scores.items()},
        }
        shown = " ".join(f"{t} {v:.2f}" for t, v in headline.items())
        extra = f" | retention {row['mean_retention']:.2f}" if ret else ""
        print(f"[{split}] {label:58s} {shown}{extra}", flush=True)
        if keep:
            self.rows.append(row)
        return row

    def singles(self, split: str) -> None:
        """Each adapter alone on its own task: the reference of retention on that split."""
        for name in self.tasks:
            row = self.run_row(f"adapter {name} alone", "single", name, split=split, keep=split == "test")
            self.reference[split][name] = row["scores"][name]
            self.reference_correct[split][name] = row["correct"][name]

    # ------------------------------------------------------------------------------ validation search
    def _val(self, label: str, mix: dict, space: str) -> dict:
        row = self.run_row(f"{label} [{space}]", "search", mix, split="val", keep=False, timing=False)
        self.search.setdefault(space, []).append({"label": label, **row})
        return row

    def tune_space(self, space: str) -> dict[str, dict]:
        """Grid searches on the validation split; returns the best mix per method family."""
        names = self.names
        best: dict[str, dict] = {}
        ta = [self._val(f"task arithmetic lambda={lam}", mix_node("task_arithmetic", names, space, weight=lam), space)
              for lam in self.grid.ta_lambdas]  # fmt: skip
        best["task_arithmetic"] = max(ta, key=_objective)
        # TIES: density at lambda 1, then lambda at that density (a coordinate search, 12 points not 36).
        ties_d = [
            self._val(f"ties density={d}", mix_node("ties", names, space, density=d), space)
            for d in self.grid.ties_densities
        ]
        d_best = max(ties_d, key=_objective)["mix"]["density"]
        ties_l = [
            self._val(
                f"ties density={d_best} lambda={lam}", mix_node("ties", names, space, density=d_best, weight=lam), space
            )
            for lam in self.grid.ties_lambdas
        ]
        best["ties"] = max([r for r in ties_d if r["mix"]["density"] == d_best] + ties_l, key=_objective)
        dare = [self._val(f"dare_ties drop={p}", mix_node("dare_ties", names, space, drop_rate=p), space)
                for p in self.grid.dare_drop_rates]  # fmt: skip
        best["dare_ties"] = max(dare, key=_objective)
        della = [self._val(f"della density={d}", mix_node("della", names, space, density=d), space)
                 for d in self.grid.della_densities]  # fmt: skip
        best["della"] = max(della, key=_objective)
        return best

    # ----------------------------------------------------------------------------------------- table
    def run(self, peft: bool = True, tuned_mix: dict | None = None) -> dict:
        names = self.names
        self.run_row("base model alone", "base", None)
        self.singles("test")
        self.singles("val")
        tuned = {space: self.tune_space(space) for space in ("dense", "lowrank")}
        for space in ("dense", "lowrank"):
            fixed = [
                ("linear average", mix_node("linear", names, space)),
                ("task arithmetic (lambda 1)", mix_node("task_arithmetic", names, space)),
                ("TIES (density 0.2, lambda 1)", mix_node("ties", names, space, density=0.2)),
                ("DARE (dare_linear, drop 0.5)", mix_node("dare_linear", names, space, drop_rate=0.5)),
                ("DARE-TIES (drop 0.5)", mix_node("dare_ties", names, space, drop_rate=0.5)),
                # Methods beyond PEFT, at their papers' / mergekit's defaults (lambda 1).
                ("TSV-M (sv_fraction 1/n)", mix_node("tsv", names, space)),
                ("Iso-C", mix_node("iso_c", names, space)),
                ("Iso-CTS (common_fraction 0.8)", mix_node("iso_cts", names, space)),
                ("DELLA (density 0.5, epsilon 0.15)", mix_node("della", names, space)),
                ("Breadcrumbs (density 0.9, gamma 0.01)", mix_node("breadcrumbs", names, space)),
            ]
            for label, mix in fixed:
                self.run_row(f"{label} [{space}]", "all", mix)
            for val_row in tuned[space].values():
                self.run_row(f"{_describe(val_row['mix'])}, tuned on val [{space}]", "all", val_row["mix"])
        if tuned_mix is not None:  # `mixserve tune`'s winner (chosen on this validation split), scored once
            space = tuned_mix.get("space", "dense")
            label = f"`mixserve tune` winner: {_describe(tuned_mix)}"
            # Also a candidate of the recommended mix: it was chosen on validation, so it competes there
            # with the grid's rows under the same rule, and the test split still decides nothing.
            self._val(label, tuned_mix, space)
            self.run_row(f"{label} [{space}]", "all", tuned_mix)
        if peft:
            self.peft_rows(tuned["dense"]["ties"]["mix"])
        for pair in PAIRS:
            if set(pair) <= set(names):
                for space in ("dense", "lowrank"):
                    for label, method, params in (("linear", "linear", {}), ("task arithmetic", "task_arithmetic", {}),
                                                  ("TIES d=0.5", "ties", {"density": 0.5})):  # fmt: skip
                        mix = mix_node(method, list(pair), space, **params)
                        self.run_row(f"{' + '.join(pair)}: {label} [{space}]", "pair", mix, tasks=list(pair))
        code, rest = [n for n in names if n in CODE_TASKS], [n for n in names if n not in CODE_TASKS]
        if len(code) == 2 and rest:
            hier = {"method": "ties", "density": 0.5, "space": "dense",
                    "children": [mix_node("linear", code, "dense"), *[{"adapter": n} for n in rest]]}  # fmt: skip
            self.run_row("hierarchical: ties(linear(python, pystr), sql, json) [dense]", "hierarchical", hier)
        candidates = [r for rows in self.search.values() for r in rows]
        recommended = max(candidates, key=_recommend_key)
        served = self.merge(recommended["mix"]).to_lowrank()
        mix = recommended["mix"]
        self.run_row(f"recommended `all-tasks`: {_describe(mix)} [{mix['space']}], as served", "recommended", mix,
                     merged=served)  # fmt: skip
        return {"rows": self.rows, "search": self.search, "recommended_mix": recommended["mix"],
                "ranking": self.intervals(), "held_out_units": self.unit_counts()}  # fmt: skip

    # ------------------------------------------------------------------------------------ intervals
    def unit_counts(self) -> dict[str, dict[str, int]]:
        """Distinct held-out units per split and task (what the intervals resample)."""
        return {split: {t: len(set(u)) for t, u in by_task.items()} for split, by_task in self.units.items()}

    def intervals(self) -> list[dict]:
        """95% intervals (``intervals.py``) on every test row's scores, kept and mean kept, into the rows;
        returns the ranking of the all-adapter rows: each against the best by mean kept, separated or not."""
        weights = split_weights(self.units["test"])
        draws = {}
        for r in self.rows:
            reference = self.reference_correct["test"] if r["retention"] else None
            r["intervals"], mean = row_intervals(r["correct"], reference, weights)
            if mean is not None:
                draws[r["row"]] = mean
        ranked = sorted((r for r in self.rows if r["group"] in RANKED and len(r["retention"]) == len(self.tasks)),
                        key=lambda r: -r["mean_retention"])  # fmt: skip
        if not ranked:
            return []
        best = draws[ranked[0]["row"]]
        return [{"row": r["row"], "mean_kept": r["mean_retention"], "interval": r["intervals"]["mean_retention"],
                 "difference_to_best": interval(best - draws[r["row"]]) if i else (0.0, 0.0),
                 "separated_from_best": bool(i) and separated(best, draws[r["row"]])}
                for i, r in enumerate(ranked)]  # fmt: skip

    def peft_rows(self, ties_mix: dict) -> None:
        """The four adapters merged by PEFT with the tuned dense TIES row's density and lambda."""
        try:
            from mixserve.eval.peft_rows import PeftMerger
        except ImportError:  # pragma: no cover - peft is in the dev extra
            print("peft is not installed: no PEFT comparison rows", flush=True)
            return
        names, lam, density = self.names, ties_mix.get("weight", 1.0), ties_mix["density"]
        merger = PeftMerger(self.model_dir, {n: self.adapter_dirs[n] for n in names})
        for combo, weights, params, label in (
            ("linear", [1.0] * len(names), {}, "linear (weights 1)"),
            ("cat", [1.0] * len(names), {}, "cat (weights 1)"),
            ("ties", [lam] * len(names), {"density": density}, f"ties (density {density}, weights {lam})"),
            ("ties_svd", [lam] * len(names), {"density": density}, f"ties_svd (density {density}, weights {lam})"),
            ("dare_ties", [1.0] * len(names), {"density": 0.5}, "dare_ties (density 0.5, weights 1)"),
        ):
            merged = merger.merge(combo, names, weights, **params)
            self.run_row(f"PEFT add_weighted_adapter {label}", "peft", {"peft": combo, "weights": weights, **params},
                         merged=merged)  # fmt: skip


RANKED = ("all", "peft", "hierarchical", "recommended")  # the rows that merge every adapter


def _describe(mix: dict) -> str:
    """A short label for a one-level mix: method, the hyper-parameters that were tuned, and the
    children's weights when any is given."""
    parts = [mix["method"]]
    for key in ("density", "drop_rate", "epsilon", "gamma", "sv_fraction", "common_fraction"):
        if key in mix:
            parts.append(f"{key.replace('_', ' ')} {mix[key]}")
    parts.append(f"lambda {mix.get('weight', 1.0)}")
    weighted = any("weight" in c for c in mix.get("children", []))
    return f"{parts[0]} ({', '.join(parts[1:])})" + (f", weights {_weights(mix)}" if weighted else "")


def _weights(mix: dict) -> str:
    """The children's weights of a one-level mix, as ``sql 1.1 / python 0.25 / ...``."""
    return " / ".join(f"{c.get('adapter', '?')} {c.get('weight', 1.0):g}" for c in mix.get("children", []))


def run_benchmark(model_dir: Path, adapter_dirs: dict[str, Path], out_dir: Path, *, n_test: int, n_val: int,
                  peft: bool = True, grid: SearchGrid | None = None, latency: tuple[int, int] = (24, 5),
                  tuned_mix: dict | None = None) -> dict:  # fmt: skip
    """Run the whole table; write ``quality.{json,md}``, ``recommended_mix.json`` and ``retention.png``."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bench = QualityBenchmark(model_dir, adapter_dirs, n_test, n_val, grid=grid, latency=latency)
    result = bench.run(peft=peft, tuned_mix=tuned_mix)
    result["reference"] = bench.reference
    result["geometry"] = adapter_geometry(bench.mut.params, bench.adapters)
    result["meta"] = {
        "model": Path(model_dir).name,
        "adapters": sorted(adapter_dirs),
        "n_test_per_task": n_test,
        "n_val_per_task": n_val,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    (out_dir / "quality.md").write_text(to_markdown(result))
    (out_dir / "recommended_mix.json").write_text(json.dumps(result["recommended_mix"], indent=1) + "\n")
    plot_results(result, out_dir / "retention.png")
    return result


def _json_default(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(type(o))
