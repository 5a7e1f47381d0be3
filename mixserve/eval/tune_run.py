"""``mixserve tune``: the mix search on the demo tasks with a transformers model, and its report.

Validation split only during the search; the winner (and the single adapters, the reference of
retention) are scored once on the test split at the end. Writes the best mix as MixSpec JSON
(accepted by ``mixserve merge --mix``, pin files and the API) and a report of every trial.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from merging.adapters import LoraAdapter, load_adapter
from merging.merge import merge_mix
from merging.spec import canonical_json, parse_mix
from mixserve.eval.harness import ModelUnderTest, evaluate
from mixserve.eval.intervals import row_intervals, split_weights
from mixserve.eval.scorers import TaskScore
from mixserve.eval.tasks import TASKS, held_out_unit, make_split
from mixserve.eval.tune import MixTuner, SearchSpace, Trial, check_tune_request, fmt_kept, mean_retention


class HarnessScorer:
    """Scores mixes on a split with the delta folded into a transformers model (greedy)."""

    def __init__(self, model_dir: Path, adapters: dict[str, LoraAdapter], batch_size: int = 32):
        self.mut = ModelUnderTest(model_dir)
        self.adapters, self.batch_size = adapters, batch_size

    def __call__(self, mix: dict | str | None, examples: dict) -> dict[str, float]:
        return {t: s.accuracy for t, s in self.score(mix, examples).items()}

    def score(self, mix: dict | str | None, examples: dict) -> dict[str, TaskScore]:
        merged = None if mix is None else merge_mix(parse_mix(mix), self.adapters)
        return evaluate(self.mut, merged, examples, batch_size=self.batch_size)


def split_intervals(test: dict[str, list], row: dict[str, TaskScore], reference: dict[str, TaskScore]) -> dict:
    """95% intervals of the test scores and kept (``intervals.py``: a bootstrap over held-out units, the
    same draws as the quality table's for the same split size), for comparing with the table's rows."""
    weights = split_weights({t: [held_out_unit(e, i) for i, e in enumerate(ex)] for t, ex in test.items()})
    ci, _ = row_intervals({t: s.correct for t, s in row.items()}, {t: s.correct for t, s in reference.items()}, weights)
    return {"scores": ci["scores"], "retention": ci["retention"], "mean_kept": ci["mean_retention"]}


def _bar(done: int, total: int, best: Trial | None, t0: float, stream=sys.stderr) -> None:
    best_txt = f"best {best.mean:.3f} ({best.mix['method']})" if best else "best -"
    line = f"tune [{'#' * (25 * done // total):<25}] {done}/{total} trials {time.perf_counter() - t0:6.0f}s {best_txt}"
    if stream.isatty():
        stream.write("\r" + line + ("\n" if done == total else ""))
    else:
        stream.write(line + "\n")
    stream.flush()


def run_tune(
    model_dir: Path,
    adapter_dirs: dict[str, Path],
    tasks: list[str],
    *,
    budget: int,
    n_val: int,
    n_test: int,
    search: SearchSpace,
    seed: int = 0,
    out: Path | None = None,
    report_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Search on validation, score the winner on test once; write ``out`` and the report."""
    check_tune_request(tasks, TASKS, budget, n_val)
    missing = [t for t in tasks if t not in adapter_dirs]
    if missing:
        raise ValueError(
            f"no adapter named after task(s) {', '.join(missing)}: retention needs each task's own adapter"
        )
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")
    t_start = time.perf_counter()
    adapters = {n: load_adapter(p, n) for n, p in adapter_dirs.items()}
    scorer = HarnessScorer(model_dir, adapters)
    val = {t: make_split(t, "val", n_val) for t in tasks}
    # The reference of retention on the validation split: each task's own adapter there.
    reference = {t: scorer(t, {t: val[t]})[t] for t in tasks}
    log("validation reference (each adapter alone): " + ", ".join(f"{t} {v:.3f}" for t, v in reference.items()))
    tuner = MixTuner(list(adapters), reference, budget=budget, search=search, seed=seed)
    t0 = time.perf_counter()
    while not tuner.done:
        number, mix = tuner.ask()
        t1 = time.perf_counter()
        try:
            scores, error = scorer(mix, val), None
        except (ValueError, RuntimeError) as exc:  # a mix the merge refuses (e.g. NaN): a failed trial
            scores, error = None, str(exc)
        tuner.tell(number, mix, scores, time.perf_counter() - t1, error)
        _bar(len(tuner.trials), budget, tuner.best(), t0)
    search_s = time.perf_counter() - t0
    best = tuner.best()
    if best is None:
        raise RuntimeError("no trial could be scored")
    result = {"summary": tuner.summary(), "validation_reference": reference, "search_seconds": search_s,
              "trials": [vars(t) for t in tuner.trials]}  # fmt: skip
    if n_test:
        test = {t: make_split(t, "test", n_test) for t in tasks}
        ref_scores = {t: scorer.score(t, {t: test[t]})[t] for t in tasks}
        row_scores = scorer.score(best.mix, test)
        test_ref = {t: s.accuracy for t, s in ref_scores.items()}
        test_scores = {t: s.accuracy for t, s in row_scores.items()}
        mean, worst, kept = mean_retention(test_scores, test_ref)
        ci = split_intervals(test, row_scores, ref_scores)
        result["test"] = {"reference": test_ref, "scores": test_scores, "retention": kept, "mean_kept": mean,
                          "worst_kept": worst, "n_per_task": n_test, "intervals": ci,
                          "held_out_units": {t: len({held_out_unit(e, i) for i, e in enumerate(ex)})
                                             for t, ex in test.items()}}  # fmt: skip
        lo, hi = ci["mean_kept"]
        log(f"test split, scored once: mean kept {mean:.3f} ({lo:.2f}-{hi:.2f}, worst {worst:.3f}); " + ", ".join(
            f"{t} {test_scores[t]:.3f}/{test_ref[t]:.3f}" for t in tasks))  # fmt: skip
    result["meta"] = {"model": str(Path(model_dir).name), "adapters": sorted(adapter_dirs), "tasks": tasks,
                      "n_val_per_task": n_val, "seed": seed, "seconds": time.perf_counter() - t_start,
                      "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                      "torch": torch.__version__}  # fmt: skip
    best_spec = json.loads(canonical_json(parse_mix(best.mix)))
    result["best_mix"] = best_spec
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(best_spec, indent=1) + "\n")
        log(f"wrote the best mix to {out}")
    if report_dir is not None:
        write_report(result, report_dir)
        log(f"wrote {report_dir}/tune.json, tune.md, tune.png")
    return result


def to_markdown(result: dict) -> str:
    s, meta = result["summary"], result["meta"]
    best = s["best"]
    lines = [
        "# Mix tuning",
        "",
        f"{s['trials_done']} trials (Optuna TPE, seed {meta['seed']}) over {', '.join(s['methods'])} in the "
        f"`{s['space']}` space; objective: mean normalized retention on the validation split "
        f"({meta['n_val_per_task']} examples per task: {', '.join(meta['tasks'])}); search "
        f"{result['search_seconds']:.0f} s, whole run {meta['seconds']:.0f} s on {meta['machine']}.",
        "",
        f"Best: trial {best['trial']}, mean kept {best['mean_kept']:.3f} on validation.",
        "",
        "```json",
        json.dumps(result["best_mix"]),
        "```",
        "",
    ]
    if "test" in result:
        t = result["test"]
        ci = t.get("intervals")
        span = (lambda lo_hi: f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})") if ci else (lambda _: "")
        lines += [
            f"Test split, scored once ({t['n_per_task']} per task): mean kept **{t['mean_kept']:.3f}**"
            f"{span(ci and ci['mean_kept'])} (worst {t['worst_kept']:.3f}); "
            + ", ".join(f"{k} {v:.3f} of {t['reference'][k]:.3f}, kept {t['retention'].get(k, 0):.2f}"
                        f"{span(ci and ci['retention'].get(k, (0, 0)))}" for k, v in t["scores"].items()),
            "",
        ]  # fmt: skip
        if ci:
            lines += ["In brackets: 95% intervals, a bootstrap over held-out units (held-out units in the test split: "
                      + ", ".join(f"{k} {n}" for k, n in t.get("held_out_units", {}).items())
                      + "; `mixserve/eval/intervals.py`, the quality table's draws).", ""]  # fmt: skip
    lines += ["| trial | method | knobs | mean kept (val) | worst | seconds |", "|---|---|---|---|---|---|"]
    for tr in result["trials"]:
        mix = tr["mix"]
        knobs = ", ".join(f"{k} {v}" for k, v in mix.items() if k not in ("method", "space", "children"))
        weights = "/".join(f"{c['weight']:g}" for c in mix["children"])
        status = tr["error"] and f"failed: {tr['error'][:60]}"
        lines.append(f"| {tr['number']} | {mix['method']} | {knobs}; weights {weights} | "
                     f"{status or fmt_kept(tr['mean'])} | {fmt_kept(tr['worst'])} | {tr['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "tune.md").write_text(to_markdown(result))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev extra
        return
    trials = [t for t in result["trials"] if t["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = sorted({t["mix"]["method"] for t in trials})
    for i, m in enumerate(methods):
        pts = [(t["number"], t["mean"]) for t in trials if t["mix"]["method"] == m]
        ax.scatter(*zip(*pts, strict=True), label=m, s=18, color=plt.cm.tab10(i % 10))
    best, line = -1.0, []
    for t in sorted(trials, key=lambda t: t["number"]):
        best = max(best, t["mean"])
        line.append((t["number"], best))
    if line:
        ax.plot(*zip(*line, strict=True), color="black", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean normalized retention (validation)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "tune.png", dpi=110)
    plt.close(fig)
