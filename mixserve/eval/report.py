"""The quality table as markdown and its plot: scores, normalized retention, the validation search."""

from __future__ import annotations

from pathlib import Path

from mixserve.eval.geometry import geometry_markdown
from mixserve.eval.tasks import TASKS
from mixserve.eval.tune import KEEP_EVERY_TASK

SECTIONS = (
    ("base", "Base and single adapters (the reference of retention)"),
    ("all", "All adapters merged by mixserve"),
    ("peft", "All adapters merged by PEFT's `add_weighted_adapter` (comparison)"),
    ("pair", "Pairs (scored on their own two tasks)"),
    ("hierarchical", "Hierarchical and recommended mixes"),
)
HEADLINE = {"sql": "SQL exec", "python": "python pass@1", "pystr": "pystr pass@1", "json": "JSON exact"}


def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}%}"


def _ret(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _with_ci(text: str, ci: list | tuple | None, fmt) -> str:
    return text if not text or ci is None else f"{text} ({fmt(ci[0])}-{fmt(ci[1])})"


def _table(rows: list[dict], tasks: list[str]) -> list[str]:
    head = [*[HEADLINE[t] for t in tasks], *[f"kept {t}" for t in tasks], "mean kept", "ms/token served (x base)",
            "merge"]  # fmt: skip
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for r in rows:
        s, ret, ci = r["scores"], r["retention"], r.get("intervals", {})
        cells = [r["row"]]
        for t in tasks:
            cell = _with_ci(_pct(s.get(t)), ci.get("scores", {}).get(t), lambda x: f"{x:.0%}")
            if t == "json" and r["json_valid"] is not None:
                cell += f", valid {r['json_valid']:.0%}"
            cells.append(cell)
        for t in tasks:
            cells.append(_with_ci(_ret(ret.get(t)), ci.get("retention", {}).get(t), _ret) if ret else "")
        cells.append(f"**{_with_ci(_ret(r['mean_retention']), ci.get('mean_retention'), _ret)}**" if ret else "")
        ms = r.get("ms_per_token")
        cells.append("" if ms is None else f"{ms:.2f} ({r['ms_vs_base']:.2f}x)")
        cells.append("-" if not r["merge_s"] else f"{r['merge_s'] * 1e3:.0f} ms")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ranking(ranking: list[dict]) -> list[str]:
    if not ranking:
        return []
    best = ranking[0]
    apart = [r for r in ranking[1:] if r["separated_from_best"]]
    out = [
        "## Ranking (mean kept, test split)",
        "",
        f"Every row that merges all adapters, best first. The best, *{best['row']}*, is separated (the 95% interval "
        f"of the paired difference in mean kept excludes 0) from {len(apart)} of the {len(ranking) - 1} other rows; "
        "the order among rows it is not separated from is not established by this table.",
        "",
        "| row | mean kept (95%) | best - row (95%) | separated from the best |",
        "|---|---|---|---|",
    ]
    for r in ranking:
        lo, hi = r["interval"]
        dlo, dhi = r["difference_to_best"]
        diff = "-" if r is best else f"{dlo:+.2f} to {dhi:+.2f}"
        sep = "-" if r is best else ("yes" if r["separated_from_best"] else "no")
        out.append(f"| {r['row']} | {r['mean_kept']:.2f} ({lo:.2f}-{hi:.2f}) | {diff} | {sep} |")
    return [*out, ""]


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    tasks = [t for t in TASKS if any(t in r["scores"] for r in rows)]
    meta = result.get("meta", {})
    out = [
        "# Quality of merges on the demo model",
        "",
        f"Test split: {meta.get('n_test_per_task', '?')} examples per task; validation split (all tuning): "
        f"{meta.get('n_val_per_task', '?')} per task. Scores: SQL execution accuracy, pass@1, JSON exact match. "
        "*kept* = normalized retention: the merge's score on a task / that task's single adapter's score "
        "(same split); *mean kept* averages it over the row's tasks. Greedy decoding. In brackets: 95% intervals "
        "from a bootstrap over held-out units (a python or string function combination; for SQL and JSON, whose "
        "held-out values are new in every example, the example), 2,000 draws, paired across rows "
        "(`mixserve/eval/intervals.py`). Held-out units in the test split: "
        + ", ".join(f"{t} {n}" for t, n in (result.get("held_out_units") or {}).get("test", {}).items())
        + ". ms/token served: a decode step at batch 1 through the serving path (the mix's cores or factors as "
        "the server holds them), median of 5 rounds taken in turns with the base model; x base = that ratio.",
        "",
    ]
    for group, title in SECTIONS:
        chosen = [r for r in rows if r["group"] == group or (group == "base" and r["group"] == "single")
                  or (group == "hierarchical" and r["group"] == "recommended")]  # fmt: skip
        if chosen:
            out += [f"## {title}", "", *_table(chosen, tasks), ""]
    out += _ranking(result.get("ranking") or [])
    if result.get("recommended_mix"):
        out += ["The recommended mix (`all-tasks`): of the validation split's candidates (the validation search "
                "below and, when given, `mixserve tune`'s winner), the one that keeps the most "
                f"of its worst task (up to {KEEP_EVERY_TASK} of the single), then the best mean kept:", "",
                "```json", _compact(result["recommended_mix"]), "```", ""]  # fmt: skip
    search = result.get("search") or {}
    if search:
        out += ["## Validation search (mean kept on the validation split)", "", "| candidate | dense | lowrank |",
                "|---|---|---|"]  # fmt: skip
        labels = list(dict.fromkeys(r["label"] for rows_ in search.values() for r in rows_))
        by = {(space, r["label"]): r for space, rows_ in search.items() for r in rows_}
        for label in labels:
            cells = [
                _ret(by[(sp, label)]["mean_retention"]) if (sp, label) in by else "" for sp in ("dense", "lowrank")
            ]
            out.append(f"| {label} | {cells[0]} | {cells[1]} |")
        out.append("")
    if "geometry" in result:
        out += ["## Adapter deltas", "", geometry_markdown(result["geometry"])]
    return "\n".join(out).rstrip() + "\n"


def _compact(mix: dict) -> str:
    import json

    return json.dumps(mix)


def plot_results(result: dict, out: Path) -> None:
    """Left: normalized retention per task for every all-adapter row; right: the validation search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["group"] in ("all", "peft", "hierarchical", "recommended")]
    tasks = [t for t in TASKS if any(t in r["retention"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2.2), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    ys = range(len(rows))
    means = [r["mean_retention"] or 0 for r in rows]
    cis = [r.get("intervals", {}).get("mean_retention") or (m, m) for r, m in zip(rows, means, strict=True)]
    err = [
        [m - lo for m, (lo, _) in zip(means, cis, strict=True)],
        [hi - m for m, (_, hi) in zip(means, cis, strict=True)],
    ]
    ax.barh(list(ys), means, xerr=err, color="0.85", ecolor="0.3", capsize=2, label="mean (95% interval)")
    for i, t in enumerate(tasks):
        ax.scatter([r["retention"].get(t) or 0 for r in rows], list(ys), s=14, color=f"C{i}", label=t, zorder=3)
    ax.axvline(KEEP_EVERY_TASK, color="k", lw=0.8, ls="--")
    ax.set_yticks(list(ys), [r["row"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="normalized retention (merged / single adapter), test split", xlim=(0, 1.15))
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    for space, style in (("dense", "-"), ("lowrank", "--")):
        pts = [r for r in (result.get("search") or {}).get(space, []) if r["label"].startswith("ties density=")
               and "lambda" not in r["label"]]  # fmt: skip
        if pts:
            ax.plot([r["mix"]["density"] for r in pts], [r["mean_retention"] for r in pts], style, marker="o",
                    color="C0", label=f"TIES density (lambda 1) [{space}]")  # fmt: skip
        pts = [r for r in (result.get("search") or {}).get(space, []) if r["label"].startswith("task arithmetic")]
        if pts:
            ax.plot([r["mix"].get("weight", 1.0) for r in pts], [r["mean_retention"] for r in pts], style, marker="s",
                    color="C1", label=f"task arithmetic lambda [{space}]")  # fmt: skip
        pts = [r for r in (result.get("search") or {}).get(space, []) if r["label"].startswith("dare_ties")]
        if pts:
            ax.plot([r["mix"]["drop_rate"] for r in pts], [r["mean_retention"] for r in pts], style, marker="^",
                    color="C2", label=f"DARE-TIES drop rate [{space}]")  # fmt: skip
    ax.set(xlabel="density / lambda / drop rate", ylabel="mean retention (validation split)", ylim=(0, 1.1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
