"""The decode-step ops proxy (``bench/ops.py``): its counting and batch layout are right; it runs end to end."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from bench.ops import count_top_level_ops, main, segments_for
from server.config import DEMO_DIR


def test_counts_only_the_ops_called_at_top_level():
    x, y = torch.ones(4), torch.ones(4)
    assert count_top_level_ops(lambda: torch.add(x, y).mul(2)) == 2
    # linear dispatches to addmm / matmul inside: still one op at the top
    w = torch.ones(3, 4)
    assert count_top_level_ops(lambda: torch.nn.functional.linear(x, w)) == 1


@pytest.mark.parametrize(("batch", "n"), [(8, 1), (8, 3), (8, 8), (5, 2)])
def test_segments_cover_the_batch_contiguously_one_per_mix(batch, n):
    mixes = [object() for _ in range(n)]
    segs = segments_for(batch, mixes)
    assert [s.lora for s in segs] == mixes
    assert segs[0].start == 0 and segs[-1].end == batch
    assert all(a.end == b.start for a, b in itertools.pairwise(segs))
    sizes = [s.end - s.start for s in segs]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.skipif(not (DEMO_DIR / "base" / "model.safetensors").is_file(), reason="models/demo not trained")
def test_the_bench_runs_end_to_end(tmp_path):
    main(["--batch", "4", "--mixes", "4", "--repeats", "1", "--out", str(tmp_path / "ops")])
    result = json.loads((tmp_path / "ops.json").read_text())
    rows = {r["scenario"]: r for r in result["rows"]}
    assert set(rows) == {"base", "1 mix", "4 mixes"}
    assert rows["4 mixes"]["segments"] == 4 and rows["1 mix"]["ops_vs_one_mix"] == 1.0
    # a mix adds its side path's products to the base model's ops
    assert rows["1 mix"]["ops_per_step"] > rows["base"]["ops_per_step"] > 0
    assert (tmp_path / "ops.md").read_text().startswith("# Decode-step ops")
