"""bench/sampler.py runs end to end on the demo model (a smoke test; its timings are not asserted)."""

from __future__ import annotations

from bench.sampler import mixed_params, run, to_markdown
from server.config import DEMO_DIR


def test_the_sampler_benchmark_runs_and_counts_one_host_copy_per_step():
    result = run(DEMO_DIR / "base", batch=8, context=16, repeats=2)
    assert result["host_copies_per_step"] == {"greedy": 1, "mixed": 1}
    assert result["ratio_mixed_over_greedy"] > 0 and "mixed / greedy" in to_markdown(result)
    kinds = mixed_params(8, 1024)
    assert any(p.penalized for p in kinds) and any(p.logit_bias for p in kinds) and any(p.truncated for p in kinds)
