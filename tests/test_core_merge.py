"""The adapter family and merges on its coordinates: the same deltas as merge_mix's lowrank space."""

from __future__ import annotations

import pytest
import torch

from merging.adapters import LoraAdapter
from merging.core_merge import core_space_reason, merge_core
from merging.family import AdapterFamily, FamilyFullError
from merging.merge import MergeError, merge_mix
from merging.spec import parse_mix
from merging.synthetic import random_adapter

SHAPES = {
    "layers.0.q": (24, 16),
    "layers.1.q": (24, 16),
    "layers.0.up": (40, 16),
    "layers.1.up": (40, 16),
    "layers.0.down": (16, 40),
}


def _adapters(seed: int = 0) -> dict[str, LoraAdapter]:
    out = {}
    for i, (name, rank) in enumerate([("sql", 4), ("python", 6), ("java", 3), ("json", 5)]):
        shapes = SHAPES if name != "java" else {m: s for m, s in SHAPES.items() if m.endswith(".q")}
        out[name] = random_adapter(name, shapes, rank=rank, alpha=2 * rank, seed=seed + i)
    return out


def _family(adapters, max_rank=256) -> AdapterFamily:
    family, refused = AdapterFamily(max_rank=max_rank).extend_all(adapters.values())
    assert not refused
    return family


def _full(core_mix, family) -> dict[str, torch.Tensor]:
    """``U C V^T`` per module, in float64 (the family's bases; the cores are float32)."""
    return {m: (family.bases[m].U @ C.double() @ family.bases[m].V.mT).float() for m, C in core_mix.cores.items()}


def _assert_same(core_mix, family, merged, rtol=1e-5):
    full = _full(core_mix, family)
    assert set(full) == set(merged.modules)
    for m, d in merged.modules.items():
        ref = d.dense()
        scale = max(ref.abs().max().item(), 1e-12)
        torch.testing.assert_close(full[m], ref, rtol=rtol, atol=rtol * scale)


def test_family_bases_are_orthonormal_and_reconstruct_every_member():
    adapters = _adapters()
    family = _family(adapters)
    assert family.version == 4
    for module, basis in family.bases.items():
        for Q in (basis.U, basis.V):
            assert Q.dtype == torch.float64  # the coordinates' merges decide on: no float32 rounding
            torch.testing.assert_close(Q.mT @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), atol=1e-12, rtol=0)
        users = [a for a in adapters.values() if module in a.modules]
        R = sum(a.modules[module].rank for a in users)
        assert basis.dims == (min(R, basis.U.shape[0]), min(R, basis.V.shape[0]))
        for a in users:
            c = family.members[a.name].modules[module]
            rebuilt = basis.U @ c.B @ c.A @ basis.V.mT * c.scale
            torch.testing.assert_close(rebuilt.float(), a.modules[module].dense(), rtol=1e-5, atol=1e-6)


def test_extending_keeps_earlier_columns_and_pads_earlier_members():
    adapters = _adapters()
    first, _ = AdapterFamily().extend_all([adapters["sql"], adapters["python"]])
    grown = first.extend(adapters["json"])
    for module, basis in first.bases.items():
        torch.testing.assert_close(grown.bases[module].U[:, : basis.dims[0]], basis.U, rtol=0, atol=0)
        old, new = first.members["sql"].modules[module], grown.members["sql"].modules[module]
        assert new.B.shape[0] == grown.bases[module].dims[0]
        assert torch.equal(new.B[: old.B.shape[0]], old.B) and not new.B[old.B.shape[0] :].any()
    # A core merged before the extension is the later one's with zeros appended.
    mix = parse_mix({"method": "ties", "density": 0.3, "children": [{"adapter": "sql"}, {"adapter": "python"}]})
    before, after = merge_core(mix, first), merge_core(mix, grown)
    for module, C in before.cores.items():
        C_after = after.cores[module]
        torch.testing.assert_close(C_after[: C.shape[0], : C.shape[1]], C, rtol=1e-4, atol=1e-5)
        assert C_after[C.shape[0] :].abs().max() < 1e-5 and C_after[:, C.shape[1] :].abs().max() < 1e-5


def test_an_adapter_already_in_the_span_adds_no_rank():
    adapters = _adapters()
    copy = LoraAdapter("sql_copy", dict(adapters["sql"].modules), fingerprint="copy")
    family = _family({**adapters, "sql_copy": copy})
    alone = _family(adapters)
    assert {m: b.dims for m, b in family.bases.items()} == {m: b.dims for m, b in alone.bases.items()}
    # Mixing an adapter with its copy: the stacked rank exceeds the family's basis; the cores are
    # padded to merge_mix's shape, so TIES trims the same entries.
    mix = parse_mix({"method": "ties", "density": 0.3, "children": [{"adapter": "sql"}, {"adapter": "sql_copy"}]})
    _assert_same(merge_core(mix, family), family, merge_mix(mix, {**adapters, "sql_copy": copy}), rtol=1e-5)


def test_the_family_bound_refuses_what_does_not_fit():
    adapters = _adapters()
    family, refused = AdapterFamily(max_rank=12).extend_all(adapters.values())
    # sql (4) + python (6) fit on every module (10); java (3) on q would make 13, json (5) 15.
    assert set(family.members) == {"sql", "python"} and set(refused) == {"java", "json"}
    assert "bound is 12" in refused["json"]
    with pytest.raises(FamilyFullError):
        family.extend(adapters["json"])
    assert family.fits(adapters["sql"]) is False  # an upper bound: 10 + 4 > 12


CHILDREN = [{"adapter": "sql", "weight": 1.0}, {"adapter": "python", "weight": 0.7}, {"adapter": "java", "weight": 1.3}]
EXACT = [
    {"method": "linear"},
    {"method": "linear", "normalize": False},
    {"method": "task_arithmetic"},
    {"method": "linear", "rank": 5},
    {"method": "tsv"},
    {"method": "iso_c", "lambda": 0.8},
    {"method": "iso_cts"},
]
SPARSE = [
    {"method": "ties", "density": 0.2},
    {"method": "ties", "density": 0.5, "majority_sign": "frequency"},
    {"method": "magnitude_prune", "density": 0.3},
    {"method": "dare_linear", "drop_rate": 0.5, "seed": 3},
    {"method": "dare_ties", "drop_rate": 0.3},
    {"method": "della", "density": 0.5, "seed": 1},
    {"method": "della_linear", "density": 0.4},
    {"method": "breadcrumbs", "density": 0.8, "gamma": 0.05},
    {"method": "breadcrumbs_ties", "density": 0.8},
    {"method": "ties", "density": 0.3, "rank": 4},
]


@pytest.mark.parametrize("params", EXACT + SPARSE, ids=lambda p: "-".join(map(str, p.values())))
def test_core_merge_equals_merge_mix_in_the_lowrank_space(params):
    adapters = _adapters()
    family = _family(adapters)
    mix = parse_mix({**params, "space": "lowrank", "weight": 0.9, "children": CHILDREN})
    merged, core = merge_mix(mix, adapters), merge_core(mix, family)
    # The same decisions (trims, signs, masks) on both sides: they agree to float32 rounding, trimming and
    # dropping methods included (the bases and cores are float64 on both; before, 1e-4 with flips).
    _assert_same(core, family, merged, rtol=1e-5)
    assert core.ranks == merged.ranks
    assert core.energy_kept.keys() == merged.energy_kept.keys()
    for m, kept in merged.energy_kept.items():
        assert core.energy_kept[m] == pytest.approx(kept, rel=1e-4)


def test_nested_mixes_and_single_adapters():
    adapters = _adapters()
    family = _family(adapters)
    nested = parse_mix({
        "method": "ties", "density": 0.4, "children": [
            {"method": "dare_ties", "drop_rate": 0.3, "weight": 0.8, "children": [{"adapter": "python"}, {"adapter": "java"}]},
            {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json", "weight": 2.0}]},
        ],
    })  # fmt: skip
    _assert_same(merge_core(nested, family), family, merge_mix(nested, adapters), rtol=1e-4)
    leaf = parse_mix({"adapter": "json", "weight": 0.5})
    _assert_same(merge_core(leaf, family), family, merge_mix(leaf, adapters))


def test_a_core_mix_as_a_merged_delta_is_the_same_delta():
    adapters = _adapters()
    family = _family(adapters)
    mix = parse_mix({"method": "ties", "density": 0.3, "children": CHILDREN})
    merged = merge_core(mix, family).to_merged(family)
    _assert_same(merge_core(mix, family), family, merged, rtol=1e-5)
    _assert_same(merge_core(mix, family), family, merge_mix(mix, adapters), rtol=1e-4)
    assert merged.method == "ties" and merged.space == "lowrank"


def test_max_rank_truncates_like_to_lowrank():
    adapters = _adapters()
    family = _family(adapters)
    mix = parse_mix({"method": "ties", "density": 0.3, "children": CHILDREN})
    merged = merge_mix(mix, adapters).to_lowrank(5)
    core = merge_core(mix, family, max_rank=5)
    _assert_same(core, family, merged, rtol=1e-4)
    assert set(core.energy_kept) == set(merged.energy_kept)


def test_what_cannot_merge_on_coordinates_says_why():
    adapters = _adapters()
    family = _family({n: a for n, a in adapters.items() if n != "json"})
    dense = parse_mix({"method": "ties", "space": "dense", "children": [{"adapter": "sql"}, {"adapter": "python"}]})
    outside = parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json"}]})
    assert core_space_reason(dense, family, adapters) == "a dense-space node"
    assert "'json' is not in the adapter family" in core_space_reason(outside, family, adapters)
    changed = {**adapters, "sql": LoraAdapter("sql", adapters["python"].modules, fingerprint="other")}
    inside = parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "python"}]})
    assert core_space_reason(inside, family, adapters) is None
    assert "'sql' is not in" in core_space_reason(inside, family, changed)
    for mix in (dense, outside):
        with pytest.raises(MergeError):
            merge_core(mix, family)


def test_non_finite_results_are_refused():
    adapters = _adapters()
    family = _family(adapters)
    children = [{**c, "weight": 3e38} for c in CHILDREN]
    huge = parse_mix({"method": "task_arithmetic", "weight": 3e38, "children": children})  # overflows fp32
    with pytest.raises(MergeError, match="NaN or Inf"):
        merge_core(huge, family)


def test_the_basis_cache_gives_the_same_result_and_is_keyed_by_adapter_set():
    from merging.core_merge import BasisCache

    adapters = _adapters()
    family = _family(adapters)
    cache = BasisCache()
    first = parse_mix({"method": "ties", "density": 0.3, "children": CHILDREN})
    other = parse_mix({"method": "dare_ties", "drop_rate": 0.4, "children": [{**c, "weight": 0.5} for c in CHILDREN]})
    reordered = parse_mix({"method": "ties", "density": 0.3, "children": CHILDREN[::-1]})
    a = merge_core(first, family, bases=cache)
    misses = cache.misses
    assert misses == 3 and cache.hits == 0 and cache.nbytes > 0 and len(cache) == 1  # q, up and down shapes
    b = merge_core(other, family, bases=cache)  # same set, other weights and method: no new basis
    assert cache.misses == misses and cache.hits == misses
    merge_core(reordered, family, bases=cache)  # the stack's order is part of the key
    assert cache.misses == 2 * misses
    for mix, got in ((first, a), (other, b)):
        ref = merge_core(mix, family)
        for m, C in ref.cores.items():
            assert torch.equal(got.cores[m], C)
    tiny = BasisCache(max_bytes=1)  # nothing fits: computed every time, never kept
    merge_core(first, family, bases=tiny)
    assert len(tiny) == 0 and tiny.nbytes == 0
