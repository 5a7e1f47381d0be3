"""A small, real evaluation on the embedded demo model: the harness, the scorers and a merge, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")


@pytest.fixture(scope="module")
def mut():
    from mixserve.eval.harness import ModelUnderTest

    return ModelUnderTest(DEMO / "base")


def test_adapter_carries_the_skill_and_a_merge_runs(mut):
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from mixserve.eval.harness import evaluate
    from mixserve.eval.tasks import make_split

    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "json")}
    # Examples the adapters were trained on (the first of their training split): this checks that the
    # harness reproduces what an adapter learned, not how well it generalises (that is the benchmark's job).
    examples = {"sql": make_split("sql", "train", 6), "json": make_split("json", "train", 6)}
    base = evaluate(mut, None, examples)
    sql_only = evaluate(mut, merge_mix(parse_mix("sql"), adapters), examples)
    # A loose bound: this checks the harness end to end, the benchmark measures the adapter (mixserve/eval/README.md).
    assert sql_only["sql"].accuracy >= 3 / 6 > base["sql"].accuracy
    assert sql_only["sql"].correct.count("1") == round(6 * sql_only["sql"].accuracy)  # per example
    mix = parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json"}]})
    merged = evaluate(mut, merge_mix(mix, adapters), examples)
    for s in merged.values():
        assert 0 <= s.accuracy <= 1
    # Folding is undone exactly: the base scores the same after the merged evaluations.
    again = evaluate(mut, None, examples)
    assert {t: s.accuracy for t, s in again.items()} == {t: s.accuracy for t, s in base.items()}


def test_benchmark_table_smoke(tmp_path):
    import json

    from merging.spec import parse_mix
    from mixserve.eval.benchmark import SMOKE_GRID, run_benchmark

    adapters = {p.name: p for p in sorted((DEMO / "adapters").iterdir())}
    tuned = {"method": "della", "space": "lowrank", "density": 0.4, "weight": 1.2,
             "children": [{"adapter": n, "weight": 0.5 + 0.25 * i} for i, n in enumerate(adapters)]}  # fmt: skip
    result = run_benchmark(DEMO / "base", adapters, tmp_path, n_test=2, n_val=2, grid=SMOKE_GRID, latency=(4, 1),
                           tuned_mix=tuned)  # fmt: skip
    rows = result["rows"]
    labels = [r["row"] for r in rows]
    assert labels[0] == "base model alone" and "adapter sql alone" in labels
    assert any("[lowrank]" in label for label in labels) and any("[dense]" in label for label in labels)
    assert {"all", "peft", "pair", "hierarchical", "recommended"} <= {r["group"] for r in rows}
    # Retention is the merged score over the single adapter's, on the same split, task by task.
    ref = result["reference"]["test"]
    for r in rows:
        if r["group"] in ("base", "single"):
            assert r["retention"] == {}
            continue
        assert set(r["retention"]) == set(r["scores"])
        for task, kept in r["retention"].items():
            assert kept == (r["scores"][task] / ref[task] if ref[task] else None)
    pair = next(r for r in rows if r["group"] == "pair")
    assert len(pair["scores"]) == 2
    # `mixserve tune`'s winner is a row of the full merges, ranked with them.
    (tuned_row,) = [r for r in rows if r["row"].startswith("`mixserve tune` winner: della")]
    assert tuned_row["group"] == "all" and tuned_row["mix"] == tuned and "json 0.5 / pystr 0.75" in tuned_row["row"]
    assert tuned_row["row"] in [r["row"] for r in result["ranking"]]
    # The recommended mix is a valid MixSpec: the validation candidate whose worst task keeps the most (up
    # to 0.85), then the best mean.
    rec = json.loads((tmp_path / "recommended_mix.json").read_text())
    parse_mix(rec)
    candidates = [r for rows_ in result["search"].values() for r in rows_]
    # The tuner's winner was chosen on validation, so it is a candidate there too (in its own space).
    (tuned_val,) = [r for r in result["search"]["lowrank"] if r["label"].startswith("`mixserve tune` winner")]
    assert tuned_val["mix"] == tuned and tuned_val["split"] == "val"
    assert result["search"]["dense"][-1]["label"].startswith("della density=")

    def key(r):
        kept = [v for v in r["retention"].values() if v is not None]
        return (min(min(kept, default=0.0), 0.85), r["mean_retention"])

    assert any(r["mix"] == rec and key(r) == max(map(key, candidates)) for r in candidates)
    # 95% intervals on every test row, from the bootstrap over held-out units; the ranking of full merges.
    assert result["held_out_units"]["test"]["sql"] == 2  # an SQL example is its own unit
    for r in rows:
        for task, (lo, hi) in r["intervals"]["scores"].items():
            assert 0 <= lo <= r["scores"][task] <= hi <= 1
        if r["retention"]:
            lo, hi = r["intervals"]["mean_retention"]
            assert lo <= r["mean_retention"] + 1e-9 and r["mean_retention"] <= hi + 1e-9
        assert r["ms_per_token"] > 0 and r["ms_vs_base"] > 0  # timed on the serving path
    assert result["ranking"][0]["mean_kept"] == max(r["mean_kept"] for r in result["ranking"])
    md = (tmp_path / "quality.md").read_text()
    assert "## Ranking (mean kept, test split)" in md and "separated from the best" in md
    assert md.count("| base model alone |") == 1 and "PEFT add_weighted_adapter cat" in md
    deltas = md.split("## Adapter deltas")[1]
    assert deltas.count("| sql |") == 1 and "| json / sql |" in deltas  # pairs in the adapters' order
    assert (tmp_path / "retention.png").stat().st_size > 10_000
    rel = result["geometry"]["relative_norm"]
    assert set(rel) == set(adapters) and all(0 < x < 10 for x in rel.values())


def test_the_latency_column_serves_each_row_as_the_server_would():
    """Lowrank mixes from member cores, dense merges and PEFT's from factors, the base bare."""
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from mixserve.eval.latency import ServingLatency
    from server.adapters.lora_pool import PreparedLora
    from server.adapters.member_pool import PreparedMembers

    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "json")}
    latency = ServingLatency(DEMO / "base", adapters, steps=2, rounds=1)
    ties = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
    dense = {**ties, "space": "dense"}
    assert isinstance(latency.prepare(ties, merge_mix(parse_mix(ties), adapters)), PreparedMembers)
    assert isinstance(latency.prepare("sql", None), PreparedMembers)
    assert isinstance(latency.prepare(dense, merge_mix(parse_mix(dense), adapters)), PreparedLora)
    assert isinstance(latency.prepare({"peft": "ties"}, merge_mix(parse_mix(dense), adapters)), PreparedLora)
    assert latency.prepare(None, None) is None
    ms, base = latency.measure(latency.prepare(ties, None))
    assert ms > 0 and base > 0
