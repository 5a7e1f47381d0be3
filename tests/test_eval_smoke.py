"""A small, real evaluation on the embedded demo model: the harness, the scorers and a merge, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="models/demo not trained")


@pytest.fixture(scope="module")
def mut():
    from eval.harness import ModelUnderTest

    return ModelUnderTest(DEMO / "base")


def test_adapter_carries_the_skill_and_a_merge_runs(mut):
    from eval.harness import evaluate
    from eval.tasks import make_split
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix

    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "json")}
    # Examples the adapters were trained on (the first of their training split): this checks that the
    # harness reproduces what an adapter learned, not how well it generalises (that is the benchmark's job).
    examples = {"sql": make_split("sql", "train", 6), "json": make_split("json", "train", 6)}
    base, _ = evaluate(mut, None, examples, latency_prompts=1)
    sql_only, ms = evaluate(mut, merge_mix(parse_mix("sql"), adapters), examples, latency_prompts=1)
    # A loose bound: this checks the harness end to end, the benchmark measures the adapter (eval/README.md).
    assert sql_only["sql"].accuracy >= 3 / 6 > base["sql"].accuracy
    assert ms > 0
    mix = parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json"}]})
    merged, _ = evaluate(mut, merge_mix(mix, adapters), examples, latency_prompts=1)
    for s in merged.values():
        assert 0 <= s.accuracy <= 1
    # Folding is undone exactly: the base scores the same after the merged evaluations.
    again, _ = evaluate(mut, None, examples, latency_prompts=1)
    assert {t: s.accuracy for t, s in again.items()} == {t: s.accuracy for t, s in base.items()}


def test_benchmark_table_smoke(tmp_path):
    from eval.benchmark import run_benchmark

    adapters = {p.name: p for p in sorted((DEMO / "adapters").iterdir())}
    result = run_benchmark(DEMO / "base", adapters, tmp_path, n_test=2, n_val=2, sweeps=False)
    labels = [r["row"] for r in result["rows"]]
    assert labels[0] == "base model alone" and "adapter sql alone" in labels
    assert any("[lowrank]" in label for label in labels) and any("[dense]" in label for label in labels)
    table, deltas = (tmp_path / "quality.md").read_text().split("\n## Adapter deltas\n")
    assert table.count("\n") == len(labels) + 2
    assert deltas.count("| sql |") == 1 and "| json / sql |" in deltas  # pairs in the adapters' order
    rel = result["geometry"]["relative_norm"]
    assert set(rel) == set(adapters) and all(0 < x < 10 for x in rel.values())
