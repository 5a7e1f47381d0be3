"""A merge's discrete decisions (trims, elected signs, drop masks, spectral ranks) do not depend on rounding.

Regression (issue 33): the demo's lowrank TIES of sql / python / json (density 0.3) elected the opposite
sign for one core entry of ``layers.3.self_attn.k_proj`` when its bases were computed in float64 instead
of float32 (children +0.12094, -0.05599, -0.06495 summing to -1.1e-6 in float32, +1.5e-6 in float64), and
that module's delta moved by 15%; the same happened with one thread instead of two, or under MKL's
compatible kernels. Decisions are now taken in float64 (merging/README.md, "Decisions that do not depend
on rounding"). These tests check the outcome, on three kinds of evidence:

* equivalent inputs: the same adapters written as other factors (``B Q``, ``Q^T A``: the same deltas) or
  in float64 give the same merge;
* another kernel set: ``tests/kernel_set_merges.py`` merges every method in both spaces (and on the
  family's cores) under this process's kernels and under ``SECOND_KERNEL_SET``, every x86 CPU's
  generic path on one thread; the records must show identical decisions;
* the numerics tests themselves pass under ``SECOND_KERNEL_SET`` (a nested pytest run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from merging.adapters import LoraAdapter, LoraFactors, load_adapter
from merging.merge import merge_mix
from merging.spec import parse_mix
from tests.kernel_set_merges import PARAMS, compare

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mixserve" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
# Another kernel set any x86 CPU runs: MKL's compatible (generic) code path and instruction set cap,
# ATen's scalar kernels, one thread (a thread count changes how LAPACK blocks its work). On this AMD
# EPYC, MKL_ENABLE_INSTRUCTIONS=SSE4_2 + ATEN_CPU_CAPABILITY=default alone gives bitwise the same merges
# as the defaults (MKL takes the same path on AMD); MKL_CBWR and the thread count are what differ.
SECOND_KERNEL_SET = {"MKL_CBWR": "COMPATIBLE", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default",
                     "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MIXSERVE_SECOND_KERNEL_SET": "1"}  # fmt: skip
NESTED = os.environ.get("MIXSERVE_SECOND_KERNEL_SET") == "1"
# The numerics tests run again under the second kernel set: merges, member cores, serving them.
NUMERICS = ["tests/test_steps.py", "tests/test_merge.py", "tests/test_core_merge.py", "tests/test_differential_peft.py",
            "tests/test_spectral.py", "tests/test_della_breadcrumbs.py", "tests/test_member_merge.py",
            "tests/test_member_serving.py",
            "tests/test_runtime.py", "tests/test_decisions.py"]  # fmt: skip


def _demo() -> dict[str, LoraAdapter]:
    return {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "python", "json")}


def _rotated(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The same deltas as other factors: ``(B Q, Q^T A)`` with a random orthogonal ``Q``, in float64."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, f in adapter.modules.items():
        Q, _ = torch.linalg.qr(torch.randn(f.rank, f.rank, generator=g, dtype=torch.float64))
        modules[name] = LoraFactors(A=Q.mT @ f.A.double(), B=f.B.double() @ Q, scale=f.scale)
    return replace(adapter, modules=modules)


def _rel(a, b) -> float:
    worst = 0.0
    assert a.modules.keys() == b.modules.keys()
    for m, d in a.modules.items():
        x, y = d.dense().double(), b.modules[m].dense().double()
        worst = max(worst, float((x - y).norm() / x.norm()))
    return worst


@needs_demo
@pytest.mark.parametrize("method", [m for m in PARAMS if m not in ("linear", "task_arithmetic")])
def test_the_same_adapters_as_other_factors_merge_to_the_same_delta(method):
    """Lowrank merges decide in bases of the stacked factors: two factorisations of the same deltas, one of
    them in float64, stack differently (other SVDs, other rounding) but span the same bases and give the
    same cores. With float32 bases the issue's TIES moved by 15% on ``layers.3.self_attn.k_proj``."""
    adapters = _demo()
    rotated = {n: _rotated(a, i) for i, (n, a) in enumerate(adapters.items())}
    children = [{"adapter": n, "weight": w} for n, w in zip(adapters, (1.0, 0.7, 0.5), strict=True)]
    issue = {"method": "ties", "density": 0.3, "children": [{"adapter": n} for n in adapters]}
    for mix in ({"method": method, **PARAMS[method], "children": children}, issue):
        spec = parse_mix(mix)
        plain, other = merge_mix(spec, adapters), merge_mix(spec, rotated, dtype=torch.float64)
        assert _rel(plain, other) < 1e-6, mix  # float32 rounding of the result; a flipped decision is >= 1e-4


def _run_record(out: Path, random_dir: Path, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, "-m", "tests.kernel_set_merges", str(out), "--random-adapters", str(random_dir)]
    if not (DEMO / "base" / "model.safetensors").is_file():
        cmd += ["--source", "mistral7b"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.skipif(NESTED, reason="already running under the second kernel set")
def test_every_method_decides_the_same_under_another_kernel_set(tmp_path):
    """Every method, both spaces and the family's cores, on the demo's adapters and on random rank-16
    adapters of a Mistral-7B-shaped layer: identical decisions (a dense result's sign pattern, hashed) and
    results within 1e-5 relative (float32 rounding of a float64 merge: 2e-7 here; a flipped decision moves
    a module by 1e-4 to 1e-1, which is what the float32 bases did: 44 of these 82 records)."""
    first = _run_record(tmp_path / "first.pt", tmp_path / "random", {})
    second = _run_record(tmp_path / "second.pt", tmp_path / "random", SECOND_KERNEL_SET)
    assert first["_env"] != second["_env"] or second["_env"]["threads"] == 1
    report = compare(first, second)
    assert len(report) >= 27
    signs = {k: v["signs_differ"] for k, v in report.items() if v["signs_differ"]}
    assert not signs, signs
    far = {k: f"{v['rel']:.1e}" for k, v in report.items() if v["rel"] > 1e-5}
    assert not far, far


@pytest.mark.skipif(NESTED, reason="already running under the second kernel set")
def test_the_numerics_tests_pass_under_another_kernel_set():
    """The merge and serving numerics tests, run again under ``SECOND_KERNEL_SET`` (their tolerances follow
    from what they compare, not from the numbers one machine's kernels gave)."""
    env = {**os.environ, **SECOND_KERNEL_SET}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NUMERICS], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
