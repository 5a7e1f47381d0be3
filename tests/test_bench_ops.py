"""The decode-step ops proxy (``bench/ops.py``): its counting and batch layout are right; it runs end to end."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from bench.ops import count_top_level_ops, main, slots_for
from server.config import DEMO_DIR


def test_counts_only_the_ops_called_at_top_level():
    x, y = torch.ones(4), torch.ones(4)
    assert count_top_level_ops(lambda: torch.add(x, y).mul(2)) == 2
    # linear dispatches to addmm / matmul inside: still one op at the top
    w = torch.ones(3, 4)
    assert count_top_level_ops(lambda: torch.nn.functional.linear(x, w)) == 1


@pytest.mark.parametrize(("batch", "n"), [(8, 1), (8, 3), (8, 8), (5, 2)])
def test_rows_spread_evenly_over_the_mixes_in_slot_order(batch, n):
    slots = list(range(1, n + 1))
    rows = slots_for(batch, slots)
    assert len(rows) == batch and rows == sorted(rows) and set(rows) == set(slots)
    sizes = [len(list(g)) for _, g in itertools.groupby(rows)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.skipif(not (DEMO_DIR / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
def test_the_bench_runs_end_to_end(tmp_path):
    main(["--batch", "4", "--mixes", "4", "--repeats", "1", "--out", str(tmp_path / "ops")])
    result = json.loads((tmp_path / "ops.json").read_text())
    rows = {r["scenario"]: r for r in result["rows"]}
    assert set(rows) == {"base", "1 mix", "4 mixes", "1 member mix", "4 member mixes over 8", "4 member mixes over 64"}
    assert rows["4 mixes"]["mixes"] == 4 and rows["base"]["mixes"] == 0 and rows["1 mix"]["ops_vs_one_mix"] == 1.0
    # a mix adds its side path's products to the base model's ops; more mixes add (almost) none: one
    # mix runs plain GEMMs, several the grouped products, whose count does not depend on how many
    assert rows["1 mix"]["ops_per_step"] > rows["base"]["ops_per_step"] > 0
    assert rows["4 mixes"]["ops_per_step"] <= 1.15 * rows["1 mix"]["ops_per_step"]
    # member mixes: few distinct adapters take one product per adapter (ops grow with them, up to the pool's
    # dense_max); with the gathered products every row reads its own members and core, so any number of mixes
    # over any number of adapters costs the ops one does
    one = rows["1 member mix"]
    assert one["ops_per_step"] > rows["base"]["ops_per_step"]
    assert one["adapters_read"] == 3 and one["bytes_allow_vs_one_mix"] == 1.0
    main(["--batch", "4", "--mixes", "4", "--repeats", "1", "--dense-max", "0", "--no-factors",
          "--out", str(tmp_path / "gathered")])  # fmt: skip
    gathered = {r["scenario"]: r for r in json.loads((tmp_path / "gathered.json").read_text())["rows"]}
    member_ops = {r["ops_per_step"] for label, r in gathered.items() if "member" in label}
    assert len(member_ops) == 1 and member_ops.pop() > gathered["base"]["ops_per_step"]
    assert rows["4 member mixes over 64"]["adapters_read"] > rows["4 member mixes over 8"]["adapters_read"] >= 3
    assert rows["4 member mixes over 64"]["bytes_allow_vs_one_mix"] > 1.0
    main(["--batch", "4", "--mixes", "2", "--repeats", "1", "--out", str(tmp_path / "ops2")])
    two = {r["scenario"]: r for r in json.loads((tmp_path / "ops2.json").read_text())["rows"]}
    assert two["2 mixes"]["ops_per_step"] == rows["4 mixes"]["ops_per_step"]
    assert (tmp_path / "ops.md").read_text().startswith("# Decode-step ops")
