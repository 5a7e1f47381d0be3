"""The merge building blocks: exact selection, trimming, sign election, DARE's expectation."""

from __future__ import annotations

import pytest
import torch

from merging import steps
from merging.steps import disjoint_mean, drop_and_rescale, elect_sign, kth_largest_magnitude, magnitude_trim


@pytest.mark.parametrize("n,k", [(2_000_003, 1), (2_000_003, 200_000), (2_000_003, 1_999_000), (3_000_000, 3_000_000)])
def test_kth_largest_is_exact_on_large_tensors(n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k)).abs()
    expected = torch.topk(x, k).values[-1]
    assert kth_largest_magnitude(x, k) == expected


def test_kth_largest_with_heavy_ties_and_zeros():
    # 60% zeros and values on a coarse grid: many ties around the threshold.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (1_500_000,), generator=g).float()
    x[:900_000] = 0
    for k in (1, 10, 300_000, 700_000, 1_500_000):
        assert kth_largest_magnitude(x, k) == torch.sort(x, descending=True).values[k - 1]


def test_kth_largest_falls_back_when_the_sample_bracket_misses(monkeypatch):
    """Regression guard: a bracket that misses must fall back to the full selection, not guess."""
    x = torch.randn(1_200_000, generator=torch.Generator().manual_seed(1)).abs()
    monkeypatch.setattr(steps, "_SAMPLE_SIZE", 4)  # a 4-entry sample brackets almost nothing
    for k in (1, 500, 600_000):
        assert kth_largest_magnitude(x, k) == torch.topk(x, k).values[-1]


def test_kth_largest_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        kth_largest_magnitude(torch.ones(3), 0)


def test_magnitude_trim_keeps_top_density_fraction():
    t = torch.tensor([[0.1, -5.0, 3.0], [-0.2, 4.0, 0.0]])
    torch.testing.assert_close(magnitude_trim(t, 0.5), torch.tensor([[0.0, -5.0, 3.0], [0.0, 4.0, 0.0]]))
    torch.testing.assert_close(magnitude_trim(t, 1.0), t)
    assert magnitude_trim(t, 0.1).abs().sum() == 0  # int(0.1 * 6) == 0 entries kept, as in PEFT
    with pytest.raises(ValueError):
        magnitude_trim(t, -0.1)


def test_elect_sign_total_vs_frequency():
    a = torch.tensor([3.0, -1.0, 0.0])
    b = torch.tensor([-1.0, -1.0, 0.0])
    c = torch.tensor([-1.0, 5.0, 0.0])
    # total: sums 1, 3, 0 -> +, +, + (a zero sum elects +); frequency: -1, -1, 0 -> -, -, +
    assert elect_sign([a, b, c], "total").tolist() == [True, True, True]
    assert elect_sign([a, b, c], "frequency").tolist() == [False, False, True]
    with pytest.raises(ValueError):
        elect_sign([a], "median")


def test_disjoint_mean_ignores_disagreeing_and_zero_entries():
    a = torch.tensor([2.0, -1.0, 0.0])
    b = torch.tensor([4.0, 3.0, 0.0])
    positive = torch.tensor([True, True, True])
    # entry 0: (2*1 + 4*0.5)/2 = 2; entry 1: only b agrees: 3*0.5/1; entry 2: nothing agrees -> 0
    torch.testing.assert_close(disjoint_mean([a, b], [1.0, 0.5], positive), torch.tensor([2.0, 1.5, 0.0]))


def test_density_one_with_agreeing_signs_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    ts = [torch.rand(50, 30, generator=g) + 0.1 for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    from merging.methods import METHODS, MergeParams, merge_tensors

    out = merge_tensors(METHODS["ties"], ts, w, MergeParams(density=1.0))
    torch.testing.assert_close(out, sum(wi * t for wi, t in zip(w, ts, strict=True)) / 3)


def test_drop_and_rescale_keeps_the_expectation():
    t = torch.linspace(-1, 1, 1000)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([drop_and_rescale(t, 0.7, steps.bernoulli_keep_mask(t.shape, 0.7, g)) for _ in range(4000)])
    # mean of 4000 draws: standard error per entry <= sqrt(0.7/0.3)/sqrt(4000) ~ 0.024
    torch.testing.assert_close(draws.mean(0), t, atol=0.12, rtol=0)
    assert abs(draws.mean().item() - t.mean().item()) < 0.01
    assert 0.68 < (draws == 0).float().mean().item() < 0.72
    with pytest.raises(ValueError, match="drop_rate"):
        drop_and_rescale(t, 1.0, torch.ones_like(t, dtype=torch.bool))
