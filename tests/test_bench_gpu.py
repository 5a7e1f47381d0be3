"""``bench/gpu.sh --tiny`` runs end to end without a GPU and says its figures are not GPU figures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_at_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu-tiny"
    subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--tiny", "--repeats", "2", "--out", str(out)], check=True,
                   cwd=ROOT, timeout=300)  # fmt: skip
    result = json.loads(out.with_suffix(".json").read_text())
    measures = [r["measure"] for r in result["rows"]]
    # CPU: the base, one factor mix on 2 side paths, one member mix; lowrank TIES and the member merges (2)
    assert sum("bs1" in m for m in measures) == 4 and sum("merge" in m for m in measures) == 3
    assert any("32 distinct mixes of 3 over 64 adapters" in m for m in measures)
    assert all(r["value"] > 0 for r in result["rows"]) and result["copy_bandwidth_gb_s"] > 0
    # The 8-mix batch gives each row what its mix's rows give alone (bf16 rounding apart).
    alone = [c for c in result["checks"] if "4 at a time, 8 mixes" in c["check"]]
    assert len(alone) == 2  # grouped and masked
    for c in alone:
        assert c["max_abs_diff"] <= 0.05 * c["logit_scale"] and c["argmax_agree"] in ("31/32", "32/32")
    assert result["gpu_measured"] is False  # --tiny never counts as a GPU figure
    if not torch.cuda.is_available():
        assert "GPU figures not measured" in out.with_suffix(".md").read_text()
