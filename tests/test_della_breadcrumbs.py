"""DELLA and Model Breadcrumbs against mergekit's definitions, and their defining properties.

The references are mergekit 0.1.5's code (``sparsify.py``'s ``magnitude_outliers`` and
``della_magprune`` with ``rescaled_masked_tensor`` (L1), and ``generalized_task_arithmetic.py``'s
consensus / normalise / lambda tail) transcribed for one tensor, with one change: the Bernoulli draw
takes an explicit generator so both sides draw the same masks. Where mergekit is installed (a dev
dependency) the transcribed Breadcrumbs mask is checked against mergekit's own function too.
"""

from __future__ import annotations

import pytest
import torch

from merging.merge import merge_mix
from merging.methods import METHODS, MergeParams, merge_tensors
from merging.spec import parse_mix
from merging.steps import magnitude_outliers, magnitude_sampling_probs
from merging.synthetic import random_adapter


# ------------------------------------------------------------------------------- mergekit's code
def ref_magnitude_outliers(tensor, density, gamma):
    if density >= 1:
        return tensor
    num_elems = tensor.numel()
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    # Reduce the outlier removal when necessary to retain the target density (mergekit 0.1.5).
    n_bot = max(0, num_elems - target_n - n_top)
    w = tensor.abs().reshape(-1).float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros(num_elems, dtype=tensor.dtype)
    mask[indices[n_bot : n_bot + target_n]] = 1
    return tensor * mask.reshape_as(tensor)


def ref_della_magprune(tensor, density, epsilon, generator):
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(torch.float32) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(torch.float32)
    masked = tensor * mask
    before, after = tensor.abs().sum(), masked.abs().sum()
    return masked if after < 1e-7 else masked * (before / after)


def ref_gta(deltas, weights, *, consensus, normalize, lam):
    weights = torch.tensor(weights, dtype=deltas[0].dtype).view(-1, 1, 1)
    deltas = torch.stack(deltas)
    weighted = deltas * weights
    if consensus:
        sign = weighted.sign()
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
        mask = sign == majority
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


def _deltas(n=3, shape=(40, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------ breadcrumbs
@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.5, 0.1), (0.9, 0.05), (0.99, 0.05)])
def test_breadcrumbs_mask_matches_mergekit(density, gamma):
    (t,) = _deltas(1)
    torch.testing.assert_close(magnitude_outliers(t, density, gamma), ref_magnitude_outliers(t, density, gamma))


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_breadcrumbs_merge_matches_mergekit(name, consensus, seed):
    ts, w = _deltas(seed=seed), [1.0, 0.6, 1.4]
    params = MergeParams(density=0.3, gamma=0.02, lam=1.3)
    want = ref_gta([ref_magnitude_outliers(t, 0.3, 0.02) for t in ts], w, consensus=consensus, normalize=False, lam=1.3)
    torch.testing.assert_close(merge_tensors(METHODS[name], ts, w, params), want)


def test_breadcrumbs_drops_outliers_and_keeps_density():
    (t,) = _deltas(1, shape=(100, 50))
    out = magnitude_outliers(t, 0.3, 0.02)
    n = t.numel()
    assert int((out != 0).sum()) == int(0.3 * n)
    top = t.abs().reshape(-1).topk(int(0.02 * n)).indices
    assert torch.count_nonzero(out.reshape(-1)[top]) == 0  # the largest 2% are gone
    kept = out != 0
    assert torch.equal(out[kept], t[kept])  # no rescaling


def test_breadcrumbs_without_outliers_is_magnitude_trim():
    # gamma * N < 1: no outlier removed, the top `density` kept (mergekit 0.1.5 too; its releases before
    # kept sort_indices[n_bot:-n_top], an empty slice there that zeroed the whole tensor).
    t = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    out = magnitude_outliers(t, 0.5, 0.01)
    assert int((out != 0).sum()) == 32
    assert float(out.abs().min()) == 0 and float(out[out != 0].abs().min()) >= float(t.abs().median())
    torch.testing.assert_close(out, ref_magnitude_outliers(t, 0.5, 0.01))


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.5, 0.1), (0.9, 0.05), (0.99, 0.05), (0.5, 0.01)])
def test_the_transcription_is_mergekits_own_breadcrumbs(density, gamma):
    sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit (a dev dependency) is not installed")
    for shape in ((40, 30), (8, 8)):
        t = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
        want = sparsify.magnitude_outliers(t, density=density, gamma=gamma)
        torch.testing.assert_close(ref_magnitude_outliers(t, density, gamma), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ DELLA
@pytest.mark.parametrize("name,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_della_merge_matches_mergekit(name, consensus, normalize, seed):
    ts, w = _deltas(seed=seed), [1.0, 0.6, 1.4]
    params = MergeParams(density=0.4, epsilon=0.1, lam=0.9)
    ours = merge_tensors(METHODS[name], ts, w, params, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sparse = [ref_della_magprune(t, 0.4, 0.1, g) for t in ts]
    want = ref_gta(sparse, w, consensus=consensus, normalize=normalize, lam=0.9)
    torch.testing.assert_close(ours, want)


def test_della_keep_probabilities_follow_magnitude_rank():
    t = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = magnitude_sampling_probs(t, 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]]))
    with pytest.raises(ValueError, match="density"):
        magnitude_sampling_probs(t, 0.1, 0.2)


def test_della_keeps_the_l1_norm_and_about_density_entries():
    (t,) = _deltas(1, shape=(200, 100))
    # (A generator seeded apart from the one that drew t: one stream for both correlates them.)
    out = merge_tensors(METHODS["della_linear"], [t], [1.0], MergeParams(density=0.3, epsilon=0.1),
                        generator=torch.Generator().manual_seed(12345))  # fmt: skip
    torch.testing.assert_close(out.abs().sum(), t.abs().sum())
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02
    # Large entries survive more often than small ones.
    big = t.abs() > t.abs().median()
    assert float((out[big] != 0).float().mean()) > float((out[~big] != 0).float().mean()) + 0.05


# ------------------------------------------------------------------------------- through merge_mix
SHAPES = {"l.q": (24, 16), "l.up": (40, 16)}


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("space", ["dense", "lowrank"])
def test_new_elementwise_methods_merge_deterministically(method, space):
    adapters = {n: random_adapter(n, SHAPES, rank=4, alpha=8, seed=i) for i, n in enumerate(("a", "b", "c"))}
    mix = parse_mix({"method": method, "space": space, "children": [{"adapter": n} for n in adapters]})
    one, two = merge_mix(mix, adapters), merge_mix(mix, adapters)
    for m, d in one.modules.items():
        assert torch.isfinite(d.dense()).all() and d.dense().abs().sum() > 0
        torch.testing.assert_close(d.dense(), two.modules[m].dense())


@pytest.mark.parametrize(
    "mix,match",
    [
        ({"method": "della", "density": 0.1}, "epsilon"),
        ({"method": "della", "epsilon": 0.6}, "epsilon"),
        ({"method": "breadcrumbs", "gamma": 1.0}, "gamma"),
        ({"method": "tsv", "sv_fraction": 0}, "sv_fraction"),
        ({"method": "iso_cts", "common_fraction": 1.5}, "common_fraction"),
        ({"method": "iso_c", "lambda": float("inf")}, "lambda"),
        ({"method": "iso_c", "lambda": 1e6}, "lambda"),
        ({"method": "ties", "lambda": 2.0}, "does not take 'lambda'"),
        ({"method": "iso_c", "density": 0.5}, "does not take 'density'"),
    ],
)
def test_bad_parameters_are_refused(mix, match):
    with pytest.raises(ValueError, match=match):
        parse_mix({**mix, "children": [{"adapter": "a"}, {"adapter": "b"}]})
