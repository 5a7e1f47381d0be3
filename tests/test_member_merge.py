"""Member merges: a lowrank mix as a core over its own members' factors is merge_mix's lowrank result, for
every method, nested mixes, duplicate and near-dependent members; the set's coordinates from Gram
matrices are an orthonormal embedding of the members' factors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from merging.adapters import LoraAdapter
from merging.core_merge import BasisCache, merge_core
from merging.family import AdapterFamily
from merging.member_merge import MAP_RTOL, SetFamilies, merge_members, set_family, stacked_factors
from merging.merge import MergeError, merge_mix
from merging.methods import METHODS
from merging.spec import parse_mix
from tests.test_core_merge import SHAPES, _adapters


def _dense(mix, adapters) -> dict[str, torch.Tensor]:
    return {m: d.dense() for m, d in mix.to_merged(adapters).modules.items()}


def _assert_same(got: dict[str, torch.Tensor], want, rtol: float = 1e-5) -> None:
    assert set(got) == set(want.modules)
    for m, d in want.modules.items():
        ref = d.dense()
        assert float((got[m] - ref).norm()) <= rtol * float(ref.norm()) + 1e-9, m


LOWRANK_METHODS = sorted(m for m in METHODS if m != "peft")


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_every_method_serves_merge_mix_lowrank_result(method):
    adapters = _adapters()
    extra = {"seed": 3} if METHODS[method].sparsify in ("random", "magnitude_sampling") else {}
    spec = parse_mix({"method": method, "space": "lowrank", **extra,
                      "children": [{"adapter": "sql"}, {"adapter": "python", "weight": 0.7}, {"adapter": "java"}]})  # fmt: skip
    mix = merge_members(spec, adapters)
    assert mix.members == ("java", "python", "sql")
    assert all(len(r) == 3 for r in mix.member_ranks.values())
    assert mix.member_ranks["layers.0.up"] == (0, 6, 4)  # java leaves up alone
    assert mix.cores["layers.0.up"].shape == (10, 10) and mix.cores["layers.0.q"].shape == (13, 13)
    _assert_same(_dense(mix, adapters), merge_mix(spec, adapters))


def test_a_nested_mix_and_a_mergekit_node():
    adapters = _adapters(5)
    nested = parse_mix({"method": "ties", "density": 0.4, "children": [
        {"method": "linear", "children": [{"adapter": "python"}, {"adapter": "json", "weight": 0.5}]},
        {"adapter": "sql"}, {"method": "dare_ties", "seed": 2, "children": [{"adapter": "java"}, {"adapter": "sql"}]}]})  # fmt: skip
    _assert_same(_dense(merge_members(nested, adapters), adapters), merge_mix(nested, adapters))
    mk = parse_mix({"method": "ties", "convention": "mergekit", "density": 0.5,
                    "children": [{"adapter": "sql", "density": 0.3}, {"adapter": "json"}]})  # fmt: skip
    _assert_same(_dense(merge_members(mk, adapters), adapters), merge_mix(mk, adapters))


def test_a_node_over_the_members_and_a_nested_node_over_them_too():
    """Only a node whose children are exactly the members' leaves takes the set's coordinates as its basis;
    here the root also has a nested child over the same adapters (its stack is not the members')."""
    adapters = _adapters(7)
    spec = parse_mix({"method": "ties", "density": 0.4, "children": [
        {"adapter": "sql"}, {"adapter": "json", "weight": 0.5},
        {"method": "dare_ties", "seed": 4, "children": [{"adapter": "json"}, {"adapter": "sql", "weight": 2.0}]}]})  # fmt: skip
    _assert_same(_dense(merge_members(spec, adapters), adapters), merge_mix(spec, adapters))


def test_the_same_decisions_as_the_whole_registry_family():
    """A set's Gram family and the registry-wide family of ``family.py`` embed the coordinates differently;
    the merged deltas agree to rounding (the steps are indifferent to the embedding)."""
    adapters = _adapters(9)
    family, _ = AdapterFamily().extend_all(adapters.values())
    for raw in ({"method": "ties", "density": 0.3, "children": [{"adapter": "sql"}, {"adapter": "json"}]},
                {"method": "della", "density": 0.5, "seed": 1, "children": [{"adapter": n} for n in adapters]},
                {"method": "tsv", "children": [{"adapter": "python"}, {"adapter": "sql"}]}):  # fmt: skip
        spec = parse_mix(raw)
        got = _dense(merge_members(spec, adapters), adapters)
        whole = merge_core(spec, family).to_merged(family)
        _assert_same(got, whole, rtol=1e-5)


def test_gram_coordinates_embed_the_members_factors():
    adapters = list(_adapters(2).values())
    family, maps = set_family(adapters)
    for m in SHAPES:
        B_cat, A_cat = stacked_factors(adapters, m, torch.float64)
        R_B, R_A, B_inv, A_inv = maps[m]
        torch.testing.assert_close(R_B.mT @ R_B, B_cat.mT @ B_cat, rtol=0, atol=1e-12)  # an isometry of span(B_cat)
        torch.testing.assert_close(R_A @ R_A.mT, A_cat @ A_cat.mT, rtol=0, atol=1e-12)
        rb, ra = family.bases[m].dims
        assert R_B.shape == (rb, B_cat.shape[1]) and R_A.shape == (A_cat.shape[0], ra)
        torch.testing.assert_close(R_B @ B_inv, torch.eye(rb, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(A_inv @ R_A, torch.eye(ra, dtype=torch.float64), rtol=0, atol=1e-10)
        assert family.bases[m].U.stride() == (0, 0)  # no basis entries are kept, only shapes


@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-3])
def test_duplicate_and_near_dependent_members(eps):
    """A copy of an adapter (exact, or perturbed by eps) in the same mix: the mix is still merge_mix's, with
    finite small cores (an exact copy's directions are held once)."""
    sql = _adapters()["sql"]
    g = torch.Generator().manual_seed(0)
    twin = LoraAdapter("twin", {m: dataclasses.replace(f, A=f.A + eps * torch.randn(f.A.shape, generator=g),
                                                       B=f.B + eps * torch.randn(f.B.shape, generator=g))
                                for m, f in sql.modules.items()}, fingerprint=f"twin{eps}")  # fmt: skip
    adapters = {"sql": sql, "twin": twin}
    for raw in ({"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "twin"}]},
                {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "twin", "weight": 0.5}]}):  # fmt: skip
        spec = parse_mix(raw)
        mix = merge_members(spec, adapters)
        assert all(torch.isfinite(c).all() and c.abs().max() < 1e3 for c in mix.cores.values())
        want = merge_mix(spec, adapters)
        # Directions under MAP_RTOL of the stack are not inverted: what they carry is lost and reported.
        kept = min(mix.energy_kept.values(), default=1.0)
        _assert_same(_dense(mix, adapters), want, rtol=max(1e-5, 2 * (1 - kept) ** 0.5 + 10 * MAP_RTOL * (eps > 0)))


def test_set_families_are_cached_bounded_and_distinct():
    adapters = _adapters()
    families, bases = SetFamilies(), BasisCache()

    def spec(w: float):
        return parse_mix(
            {"method": "ties", "density": 0.5, "children": [{"adapter": "sql", "weight": w}, {"adapter": "json"}]}
        )

    first = merge_members(spec(1.0), adapters, families=families, bases=bases)
    again = merge_members(spec(0.5), adapters, families=families, bases=bases)
    assert (families.hits, families.misses, len(families)) == (1, 1, 1) and families.nbytes > 0
    assert bases.hits == bases.misses == 0  # a node over exactly the set's members computes no bases at all
    assert not torch.equal(first.cores["layers.0.q"], again.cores["layers.0.q"])
    other = merge_members(parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "python"}]}),
                          adapters, families=families)  # fmt: skip
    assert len(families) == 2 and other.members == ("python", "sql")
    # A set whose contents changed (same names) is another set: another family, never the old one.
    changed = dict(adapters, json=dataclasses.replace(adapters["json"], fingerprint="new"))
    merge_members(spec(1.0), changed, families=families)
    assert len(families) == 3
    tiny = SetFamilies(max_bytes=1)  # nothing fits: merges still work, nothing is kept
    merge_members(spec(1.0), adapters, families=tiny)
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_refusals():
    adapters = _adapters()
    with pytest.raises(MergeError, match="unknown adapter"):
        merge_members(parse_mix({"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "nope"}]}), adapters)
    with pytest.raises(MergeError, match="dense-space"):
        merge_members(parse_mix({"method": "ties", "space": "dense", "children": [{"adapter": "sql"}]}), adapters)
    mix = merge_members(parse_mix("sql"), adapters)
    with pytest.raises(MergeError, match="changed"):
        mix.to_merged(dict(adapters, sql=dataclasses.replace(adapters["sql"], fingerprint="other")))


def test_cached_own_gram_blocks_give_bitwise_the_same_cores():
    """A set whose members' own Gram blocks were cached by earlier sets computes only its cross blocks: its
    cores are bitwise those of a merge with nothing cached (each block is the same product either way)."""
    adapters = _adapters(3)

    def spec(*names):
        return parse_mix({"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in names]})

    fresh = merge_members(spec("sql", "json", "python"), adapters, families=SetFamilies())
    warm = SetFamilies()
    merge_members(spec("sql", "json"), adapters, families=warm)
    merge_members(spec("python", "java"), adapters, families=warm)
    assert warm.own_grams.nbytes > 0
    again = merge_members(spec("sql", "json", "python"), adapters, families=warm)
    assert all(torch.equal(fresh.cores[m], again.cores[m]) for m in fresh.cores)
