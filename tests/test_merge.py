"""merge_mix: low-rank space against dense, nesting, determinism, provenance, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.delta import DenseDelta, LowRankDelta, refactor_lowrank
from merging.merge import MergeError, merge_mix, mix_key
from merging.spec import parse_mix
from merging.synthetic import random_adapter

SHAPES = {"l.q": (24, 16), "l.up": (40, 16), "l.down": (16, 40)}


def _adapters(ranks=(4, 6, 3), seed=0):
    names = ["sql", "python", "java"]
    out = {}
    for i, (n, r) in enumerate(zip(names, ranks, strict=True)):
        shapes = SHAPES if n != "java" else {"l.q": SHAPES["l.q"]}  # java leaves the MLP untouched
        out[n] = random_adapter(n, shapes, rank=r, alpha=2 * r, seed=seed + i)
    return out


def _dense(merged):
    return {m: d.dense() for m, d in merged.modules.items()}


def _close(a, b, tol=1e-5):
    scale = max(b.abs().max().item(), 1e-12)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=3, max_size=3).filter(lambda w: abs(sum(w)) > 0.1),
    st.sampled_from(["linear", "task_arithmetic"]),
    st.integers(0, 1000),
)
def test_linear_lowrank_equals_dense(weights, method, seed):
    adapters = _adapters(seed=seed)
    children = [{"adapter": n, "weight": w} for n, w in zip(adapters, weights, strict=True)]
    low = merge_mix(parse_mix({"method": method, "space": "lowrank", "children": children}), adapters)
    dense = merge_mix(parse_mix({"method": method, "space": "dense", "children": children}), adapters)
    for m, d in low.modules.items():
        assert isinstance(d, LowRankDelta) and isinstance(dense.modules[m], DenseDelta)
        assert d.rank <= sum(a.modules[m].rank for a in adapters.values() if m in a.modules)
        _close(d.dense(), dense.modules[m].dense())


@pytest.mark.parametrize(
    "method,params", [("ties", {"density": 0.3}), ("dare_ties", {"drop_rate": 0.5}), ("magnitude_prune", {})]
)
def test_lowrank_sparse_methods_stay_low_rank_and_finite(method, params):
    adapters = _adapters()
    mix = parse_mix({"method": method, "space": "lowrank", **params, "children": [{"adapter": n} for n in adapters]})
    merged = merge_mix(mix, adapters)
    assert set(merged.modules) == set(SHAPES)
    for m, d in merged.modules.items():
        assert isinstance(d, LowRankDelta)
        assert d.rank <= sum(a.modules[m].rank for a in adapters.values() if m in a.modules)
        assert torch.isfinite(d.dense()).all() and d.dense().abs().sum() > 0


def test_dare_is_deterministic_per_seed_and_differs_across_seeds():
    adapters = _adapters()

    def run(seed, space):
        mix = parse_mix(
            {
                "method": "dare_linear",
                "drop_rate": 0.5,
                "seed": seed,
                "space": space,
                "children": [{"adapter": "sql"}, {"adapter": "python"}],
            }
        )
        return _dense(merge_mix(mix, adapters))

    for space in ("dense", "lowrank"):
        a, b, c = run(7, space), run(7, space), run(8, space)
        for m in a:
            assert torch.equal(a[m], b[m])
            assert not torch.equal(a[m], c[m])


def test_nested_mix_equals_merging_the_inner_result_by_hand():
    """ties(task_arithmetic(python, java), sql) in dense space == ties over [inner dW, sql dW]."""
    adapters = _adapters()
    inner = {
        "method": "task_arithmetic",
        "space": "dense",
        "weight": 0.7,
        "children": [{"adapter": "python", "weight": 0.5}, {"adapter": "java", "weight": 1.5}],
    }
    mix = parse_mix(
        {"method": "ties", "density": 0.4, "space": "dense", "children": [inner, {"adapter": "sql", "weight": 1.2}]}
    )
    merged = merge_mix(mix, adapters)
    from peft.utils import merge_utils

    for m in SHAPES:
        py = adapters["python"].modules[m].dense()
        java = adapters["java"].modules[m].dense() if m in adapters["java"].modules else torch.zeros(SHAPES[m])
        inner_dw = 0.5 * py + 1.5 * java
        expected = merge_utils.ties([inner_dw, adapters["sql"].modules[m].dense()], torch.tensor([0.7, 1.2]), 0.4)
        _close(merged.modules[m].dense(), expected)


def test_nested_dense_child_in_lowrank_parent_is_refactored_and_reports_energy():
    adapters = _adapters()
    inner = {
        "method": "ties",
        "density": 0.5,
        "space": "dense",
        "rank": 2,
        "children": [{"adapter": "python"}, {"adapter": "java"}],
    }
    mix = parse_mix({"method": "linear", "space": "lowrank", "children": [inner, {"adapter": "sql"}]})
    merged = merge_mix(mix, adapters)
    assert all(isinstance(d, LowRankDelta) for d in merged.modules.values())
    assert set(merged.energy_kept) == set(SHAPES)
    assert all(0 < e < 1 for e in merged.energy_kept.values())  # rank 2 < the dense TIES result's rank


def test_root_weight_scales_the_whole_delta_and_a_single_adapter_is_a_mix():
    adapters = _adapters()
    alone = merge_mix(parse_mix("sql"), adapters)
    half = merge_mix(parse_mix({"adapter": "sql", "weight": 0.5}), adapters)
    for m, d in alone.modules.items():
        _close(d.dense(), adapters["sql"].modules[m].dense())
        _close(half.modules[m].dense(), 0.5 * d.dense())
    # Results never alias adapter tensors: mutating one must not change the adapter.
    d = alone.modules["l.q"]
    d.A.zero_()
    assert adapters["sql"].modules["l.q"].A.abs().sum() > 0


def test_lowrank_rank_option_truncates_in_the_core():
    adapters = _adapters()
    mix = parse_mix({"method": "task_arithmetic", "rank": 3, "children": [{"adapter": n} for n in adapters]})
    merged = merge_mix(mix, adapters)
    full = merge_mix(parse_mix({"method": "task_arithmetic", "children": [{"adapter": n} for n in adapters]}), adapters)
    for m, d in merged.modules.items():
        assert d.rank == 3
        best = refactor_lowrank(full.modules[m].dense(), 3)  # the optimal rank-3 approximation
        _close(d.dense(), best.delta.dense(), tol=1e-4)
        assert merged.energy_kept[m] == pytest.approx(best.energy_kept, rel=1e-4)


def test_refactor_lowrank_is_exact_at_full_rank_and_reports_energy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    ref = refactor_lowrank(W, 5)
    _close(ref.delta.dense(), W, tol=1e-4)
    assert ref.energy_kept == pytest.approx(1.0, abs=1e-5)
    low = refactor_lowrank(W, 2)
    assert 0 < low.energy_kept < 1 and low.delta.rank == 2
    with pytest.raises(ValueError):
        refactor_lowrank(W, 0)


def test_unknown_adapter_and_incompatible_shapes_are_merge_errors():
    adapters = _adapters()
    with pytest.raises(MergeError, match=r"unknown adapter.*'nope'"):
        merge_mix(parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "nope"}]}), adapters)
    adapters["odd"] = random_adapter("odd", {"l.q": (24, 17)}, rank=2, seed=9)
    with pytest.raises(MergeError, match=r"l\.q"):
        merge_mix(parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "odd"}]}), adapters)


def test_mix_key_changes_with_adapter_contents():
    a = _adapters()
    mix = parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "python"}]})
    key = mix_key(mix, a)
    assert key == mix_key(mix, _adapters())
    b = _adapters(seed=5)  # same names, different weights -> different fingerprints
    assert key != mix_key(mix, b)


def test_progress_reports_every_module():
    seen = []
    merge_mix(
        parse_mix({"method": "linear", "children": [{"adapter": "sql"}]}),
        _adapters(),
        progress=lambda d, t, m: seen.append((d, t, m)),
    )
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 for s in seen)


def test_shared_basis_reconstructs_every_child_exactly():
    from merging.lowrank import from_core, shared_basis

    adapters = _adapters()
    factors = [
        LowRankDelta(A=a.modules["l.up"].A, B=a.modules["l.up"].B, scale=a.modules["l.up"].scale)
        for a in adapters.values()
        if "l.up" in a.modules
    ]
    basis = shared_basis(factors)
    assert basis.Q_B.shape[1] == sum(f.rank for f in factors)
    # Bases and cores are float64 whatever the factors' dtype (what merges decide on them must not round).
    assert basis.Q_B.dtype == basis.Q_A.dtype == basis.cores[0].dtype == torch.float64
    eye = torch.eye(basis.Q_B.shape[1], dtype=torch.float64)
    torch.testing.assert_close(basis.Q_B.mT @ basis.Q_B, eye, atol=1e-12, rtol=0)
    for f, core in zip(factors, basis.cores, strict=True):
        _close(basis.Q_B @ core @ basis.Q_A.mT, f.to(torch.float64).dense(), tol=1e-12)
    delta, kept = from_core(basis, basis.cores[0], rank=2)
    assert delta.rank == 2 and 0 < kept < 1
