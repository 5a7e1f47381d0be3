"""Next-token choice: greedy, seeded sampling, and temperatures too small to divide by."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling import SamplingParams, make_generator, sample_next


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-30, 1e-6])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperatures_are_greedy_not_nan(temperature, top_p):
    """Found by the API fuzzer: temperature 1e-300 made fp32 logits / T = 0 / 0 and multinomial raised."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=3)
    assert sample_next(logits, params, make_generator(params)) == int(logits.argmax())


def test_a_seed_fixes_the_sample_and_top_p_keeps_the_likely_tokens():
    logits = torch.tensor([4.0, 3.9, -5.0, -6.0])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    draws = [sample_next(logits, params, make_generator(params)) for _ in range(5)]
    assert len(set(draws)) == 1 and draws[0] in (0, 1)
    g = make_generator(SamplingParams(temperature=1.0, top_p=0.9, seed=1))
    assert {sample_next(logits, params, g) for _ in range(200)} <= {0, 1}
