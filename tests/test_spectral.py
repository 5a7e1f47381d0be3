"""TSV-M, Iso-C and Iso-CTS against the authors' code, their defining properties, and dense = lowrank.

The references below are the authors' per-layer code for one 2-D key, transcribed with only the
config plumbing removed: TSV-M from AntoAndGar/task_singular_vectors
(``compute_and_sum_svd_mem_reduction``, commit a6c9718), Iso-C and Iso-CTS from
danielm1405/iso-merging (``src/utils/iso.py``, commit d34010a). They assume full-rank task
matrices, so the comparison uses full-rank random ones, where mixserve's definitions (fractions of
the space the tasks span, nonzero singular values only) coincide with theirs.
"""

from __future__ import annotations

import pytest
import torch

from merging.delta import DenseDelta, LowRankDelta
from merging.merge import merge_mix
from merging.methods import METHODS, MergeParams, merge_tensors
from merging.spec import parse_mix
from merging.spectral import iso_c, iso_cts, numerical_rank, polar_factor, tsv_merge
from merging.synthetic import random_adapter


def _tasks(n=3, shape=(12, 9), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(n)]


# ------------------------------------------------------------------------------ the authors' code
def ref_tsv(tvs):
    sv_reduction = 1 / len(tvs)
    for i, vec in enumerate(tvs):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        r = int(s.shape[0] * sv_reduction)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_v[i * r : (i + 1) * r, :] = v[:r, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def ref_iso_c(tvs):
    total = sum(tvs)
    U, S, V = torch.linalg.svd(total, full_matrices=False)
    return torch.linalg.multi_dot((U, torch.diag(torch.ones_like(S) * S.mean()), V))


def ref_iso_cts(tvs, common_space_fraction=0.8):
    shape_ = tvs[0].shape
    n = len(tvs)
    combined_w = sum(tvs)
    common = int(min(shape_) * common_space_fraction)
    common = min(shape_) - round((min(shape_) - common) / n) * n
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((min(shape_) - common) / n)
    for i, w in enumerate(tvs):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            U, S, V = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        U[:, i * per : (i + 1) * per] = u_ts[:, :per]
        S[i * per : (i + 1) * per] = s_ts[:per]
        V[i * per : (i + 1) * per, :] = v_ts[:per, :]
    U[:, n * per : n * per + common] = cu
    S[n * per : n * per + common] = cs
    V[n * per : n * per + common, :] = cv
    uu, _, vu = torch.linalg.svd(U, full_matrices=False)
    uv, _, vv = torch.linalg.svd(V, full_matrices=False)
    return torch.linalg.multi_dot((uu @ vu, torch.diag(torch.ones_like(S) * S.mean()), uv @ vv))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tsv_matches_the_authors_code(seed):
    tvs = _tasks(seed=seed)
    torch.testing.assert_close(tsv_merge(tvs, fraction=1 / 3), ref_tsv(tvs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iso_c_matches_the_authors_code(seed):
    tvs = _tasks(seed=seed)
    torch.testing.assert_close(iso_c(tvs), ref_iso_c(tvs))


@pytest.mark.parametrize("seed,shape,n", [(0, (12, 9), 3), (1, (20, 16), 3), (2, (16, 16), 4)])
def test_iso_cts_matches_the_authors_code(seed, shape, n):
    tvs = _tasks(n=n, shape=shape, seed=seed)
    torch.testing.assert_close(iso_cts(tvs, 0.8), ref_iso_cts(tvs, 0.8))


# ------------------------------------------------------------------------ the defining properties
def _low_rank_tasks(n=3, shape=(30, 24), rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
        @ torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
        for _ in range(n)
    ]


def _projector(M, rtol=1e-8):
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    U = U[:, : numerical_rank(S, rtol)]
    return U @ U.T


@pytest.mark.parametrize("tasks", [_tasks(), _low_rank_tasks()], ids=["full-rank", "low-rank"])
def test_iso_c_flat_spectrum_in_the_sums_span(tasks):
    total = sum(tasks)
    out = iso_c(tasks, lam=1.7)
    S_out = torch.linalg.svdvals(out)
    S_sum = torch.linalg.svdvals(total)
    r = numerical_rank(S_sum)
    assert numerical_rank(S_out) == r  # no null-space direction added, none lost
    torch.testing.assert_close(S_out[:r], torch.full((r,), 1.7 * float(S_sum[:r].mean()), dtype=out.dtype))
    # Same column and row spaces as the task-arithmetic sum.
    torch.testing.assert_close(_projector(total) @ out, out)
    torch.testing.assert_close(out @ _projector(total.T), out)


def test_tsv_of_orthogonal_tasks_is_task_arithmetic():
    # Tasks on disjoint singular directions do not interfere: Procrustes changes nothing.
    Q1, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    Q2, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    tasks = [(Q1[:, 3 * i : 3 * i + 3] * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ Q2[:, 3 * i : 3 * i + 3].T
             for i in range(3)]  # fmt: skip
    torch.testing.assert_close(tsv_merge(tasks, fraction=1 / 3), sum(tasks))
    torch.testing.assert_close(tsv_merge(tasks, fraction=1 / 3, lam=0.5), 0.5 * sum(tasks))


def test_tsv_keeps_each_tasks_top_components():
    tasks = _low_rank_tasks(n=2, rank=6)
    # D = 12; fraction 0.25 keeps the top 3 of each task's 6 components: the result has rank 6.
    out = tsv_merge(tasks, fraction=0.25)
    assert numerical_rank(torch.linalg.svdvals(out)) == 6
    # The kept singular values are each task's top 3, unchanged by the orthogonalisation.
    kept = torch.cat([torch.linalg.svdvals(t)[:3] for t in tasks]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(out)[:6], kept)


def test_polar_factor_of_dependent_columns_is_well_defined():
    X = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = polar_factor(torch.cat([X, X], dim=1))  # the same adapter twice
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P, torch.cat([polar_factor(X), polar_factor(X)], dim=1) / 2**0.5)


def test_iso_cts_properties():
    tasks = _low_rank_tasks(n=3, rank=4)
    out = iso_cts(tasks, common_fraction=0.5, lam=2.0)
    S = torch.linalg.svdvals(out)
    r = numerical_rank(S)
    assert r == 12  # D = 12: 6 common + 2 per task
    torch.testing.assert_close(S[:r], torch.full((r,), float(S[0]), dtype=S.dtype))
    # Common fraction 1: everything from the sum, which is Iso-C.
    torch.testing.assert_close(iso_cts(tasks, common_fraction=1.0), iso_c(tasks))
    # Its directions lie in the span of the tasks (a task's own directions are in its column space).
    stacked = torch.cat(tasks, dim=1)
    torch.testing.assert_close(_projector(stacked) @ out, out)


def test_iso_cts_gives_a_task_that_leaves_the_module_untouched_no_share():
    """Like TSV-M's default fraction: a child with no delta on a module (an adapter that does not touch
    it) is not a task there; before, it took a share of the space and a real task's directions were dropped."""
    tasks = _low_rank_tasks(n=2, rank=4)
    alone = iso_cts(tasks, common_fraction=0.8)
    torch.testing.assert_close(iso_cts([*tasks, torch.zeros_like(tasks[0])], common_fraction=0.8), alone)
    assert numerical_rank(torch.linalg.svdvals(alone)) == 8  # every direction of the two tasks kept


def test_zero_tasks_merge_to_zero():
    z = [torch.zeros(6, 5), torch.zeros(6, 5)]
    for fn in (lambda t: tsv_merge(t, 0.5), iso_c, iso_cts):
        assert torch.count_nonzero(fn(z)) == 0


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_weights_scale_the_task_matrices(name):
    tasks = _tasks(dtype=torch.float32)
    params = MergeParams(lam=1.0)
    a = merge_tensors(METHODS[name], tasks, [2.0, 1.0, 0.5], params)
    b = merge_tensors(METHODS[name], [tasks[0] * 2, tasks[1], tasks[2] * 0.5], [1.0, 1.0, 1.0], params)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- dense = low-rank
SHAPES = {"l.q": (48, 32), "l.up": (64, 32), "l.down": (32, 64)}


def _adapters():
    out = {}
    for i, (n, r) in enumerate((("sql", 4), ("python", 6), ("java", 3))):
        shapes = SHAPES if n != "java" else {"l.q": SHAPES["l.q"]}  # java leaves the MLP untouched
        out[n] = random_adapter(n, shapes, rank=r, alpha=2 * r, seed=10 + i)
    return out


@pytest.mark.parametrize(
    "method,params",
    [("tsv", {}), ("tsv", {"sv_fraction": 0.2, "lambda": 1.5}), ("iso_c", {"lambda": 1.3}), ("iso_cts", {}),
     ("iso_cts", {"common_fraction": 0.5})],
)  # fmt: skip
def test_spectral_methods_are_the_same_in_both_spaces(method, params):
    adapters = _adapters()
    children = [{"adapter": n, "weight": w} for n, w in zip(adapters, (1.0, 0.7, 1.2), strict=True)]
    low = merge_mix(parse_mix({"method": method, "space": "lowrank", **params, "children": children}), adapters)
    dense = merge_mix(parse_mix({"method": method, "space": "dense", **params, "children": children}), adapters)
    assert set(low.modules) == set(dense.modules) == set(SHAPES)
    for m, d in low.modules.items():
        assert isinstance(d, LowRankDelta) and isinstance(dense.modules[m], DenseDelta)
        want = dense.modules[m].dense()
        torch.testing.assert_close(d.dense(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_spectral_methods_nest_and_truncate():
    adapters = _adapters()
    mix = parse_mix({
        "method": "iso_c", "space": "lowrank", "rank": 4,
        "children": [{"method": "tsv", "children": [{"adapter": "sql"}, {"adapter": "python"}]}, {"adapter": "java"}],
    })  # fmt: skip
    merged = merge_mix(mix, adapters)
    assert all(d.rank <= 4 for d in merged.modules.values())
    assert all(0 < k <= 1 for k in merged.energy_kept.values())


@pytest.mark.parametrize("space", ["dense", "lowrank"])
def test_tsv_keeps_a_module_that_only_some_children_touch(space):
    # l.up is touched by sql and python only, l.q by all three: the default fraction counts the
    # children that touch the module, so no adapter is cut down where others are absent.
    adapters = _adapters()
    mix = parse_mix({"method": "tsv", "space": space, "children": [{"adapter": n} for n in adapters]})
    merged = merge_mix(mix, adapters)
    for m in ("l.up", "l.down"):
        got = merged.modules[m].dense()
        touching = [a for a in adapters.values() if m in a.modules]
        assert len(touching) == 2
        # D = 4 + 6 = 10, fraction 1/2: sql keeps its 4 components, python 5 of its 6 (the paper's equal
        # share of the space); counting the untouching child too (1/3) would keep 3 + 3.
        assert numerical_rank(torch.linalg.svdvals(got)) == 9
    one = {"sql": adapters["sql"]}
    alone = merge_mix(parse_mix({"method": "tsv", "space": space, "children": [{"adapter": "sql"},
                      {"method": "tsv", "weight": 0.0, "children": [{"adapter": "sql"}]}]}), one)  # fmt: skip
    for m, d in alone.modules.items():  # a weight-0 child does not halve the other
        want = adapters["sql"].modules[m].dense()
        torch.testing.assert_close(d.dense(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_iso_cts_is_basis_independent_when_tasks_cancel():
    # The sum has a lower rank than the common subspace asks for: the null-space directions LAPACK
    # returns past that rank are arbitrary and must not be projected on. (Near-cancellation, e.g.
    # weight -0.999, stays ill-conditioned: directions near the rank threshold get the full flat gain.)
    adapters = _adapters()
    children = [{"adapter": "sql"}, {"adapter": "sql", "weight": -1.0}, {"adapter": "python"}]
    low = merge_mix(parse_mix({"method": "iso_cts", "space": "lowrank", "children": children}), adapters)
    dense = merge_mix(parse_mix({"method": "iso_cts", "space": "dense", "children": children}), adapters)
    for m, d in low.modules.items():
        want = dense.modules[m].dense()
        torch.testing.assert_close(d.dense(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_half_precision_task_matrices(name):
    tasks = [t.to(torch.bfloat16) for t in _tasks(dtype=torch.float32)]
    out = merge_tensors(METHODS[name], tasks, [1.0, 1.0, 1.0], MergeParams())
    assert out.dtype == torch.bfloat16
    want = merge_tensors(METHODS[name], [t.float() for t in tasks], [1.0, 1.0, 1.0], MergeParams())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
