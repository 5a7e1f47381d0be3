"""The batched sampler: each stage against a per-row reference, seeds that hold whatever the batch,
logprobs from the distribution the token was drawn from, one host copy per step."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.sampler import Sampler, SampleRow, prompt_logprobs
from server.engine.sampling import SamplingParams, make_generator

VOCAB = 50


def logits_of(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-30, 1e-6])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperatures_are_greedy_not_nan(temperature, top_p):
    """Found by the API fuzzer: temperature 1e-300 made fp32 logits / T = 0 / 0 and multinomial raised."""
    logits = logits_of(1)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=3)
    out = Sampler().sample(logits.clone(), [SampleRow(params, make_generator(params))])
    assert out.tokens == [int(logits.argmax())]


def test_a_seeded_row_samples_the_same_tokens_whatever_its_batch():
    base = logits_of(8, seed=1)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler().sample(base[3:4].clone(), [SampleRow(params, make_generator(params))]).tokens[0]
             for _ in range(3)]  # fmt: skip
    others = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(), SamplingParams(temperature=1.3, seed=1)]
    rows = [SampleRow(p, make_generator(p)) for p in others] + [SampleRow(params, make_generator(params))]
    batched = Sampler(seed=9).sample(torch.cat([base[:3], base[3:4]]).clone(), rows).tokens[3]
    assert len(set(alone)) == 1 and batched == alone[0]
    # Over many steps the seeded stream is the same too (each step draws its own noise).
    g1, g2 = make_generator(params), make_generator(params)
    a = [Sampler().sample(base[3:4].clone(), [SampleRow(params, g1)]).tokens[0] for _ in range(20)]
    b = [Sampler().sample(base[:4].clone(), [*rows[:3], SampleRow(params, g2)]).tokens[3] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler, counts = Sampler(seed=0), torch.zeros(4)
    for _ in range(4000):
        counts[sampler.sample(logits.clone(), [SampleRow(SamplingParams(temperature=1.0))]).tokens[0]] += 1
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_top_k_top_p_min_p_keep_exactly_the_tokens_they_should():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0], -1)
    sampler = Sampler(seed=0)

    def seen(**kw) -> set[int]:
        return {sampler.sample(logits.clone(), [SampleRow(SamplingParams(temperature=1.0, **kw))]).tokens[0]
                for _ in range(600)}  # fmt: skip

    assert seen(top_k=2) == {0, 1}
    # top_p: the smallest set of most likely tokens whose mass reaches p
    p = float(probs[:2].sum()) + 0.01
    assert seen(top_p=p) == {0, 1, 2}
    assert seen(top_p=float(probs[0]) - 0.01) == {0}
    assert seen(min_p=float(probs[2] / probs[0]) - 1e-4) == {0, 1, 2}
    assert seen(top_k=3, min_p=float(probs[1] / probs[0]) - 1e-4) == {0, 1}


def test_penalties_and_bias_match_their_definitions():
    logits = logits_of(2, seed=3)
    out = [3, 3, 7]
    prompt = frozenset({1, 7, 11})
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3,
                            logit_bias=((5, 2.0), (11, -1.0)), logprobs=VOCAB - 1)  # fmt: skip
    rows = [SampleRow(params, None, out, prompt), SampleRow(SamplingParams(logprobs=3))]
    got = Sampler().sample(logits.clone(), rows)
    ref = logits[0].clone()
    ref[5] += 2.0
    ref[11] -= 1.0
    for t in {1, 3, 7, 11}:  # prompt or output: repetition penalty
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    ref[3] -= 0.25 * 2 + 0.5
    ref[7] -= 0.25 * 1 + 0.5
    assert got.tokens[0] == int(ref.argmax())
    lp = torch.log_softmax(ref, -1)
    assert math.isclose(got.logprobs[0], float(lp[got.tokens[0]]), abs_tol=1e-5)
    top = dict(got.top[0])
    assert all(math.isclose(top[t], float(lp[t]), abs_tol=1e-5) for t in top)
    # The other row is untouched by the first one's parameters.
    assert got.tokens[1] == int(logits[1].argmax())
    assert math.isclose(got.logprobs[1], float(torch.log_softmax(logits[1], -1).max()), abs_tol=1e-5)


def test_logprobs_of_a_sampled_row_are_of_the_truncated_tempered_distribution():
    logits = logits_of(1, seed=4)
    params = SamplingParams(temperature=0.5, top_k=4, logprobs=5)
    got = Sampler(seed=1).sample(logits.clone(), [SampleRow(params)])
    scaled = logits[0] / 0.5
    kept = scaled.topk(4).indices
    ref = torch.full_like(scaled, float("-inf"))
    ref[kept] = scaled[kept]
    lp = torch.log_softmax(ref, -1)
    assert got.tokens[0] in kept.tolist()
    assert math.isclose(got.logprobs[0], float(lp[got.tokens[0]]), abs_tol=1e-5)
    assert [t for t, _ in got.top[0][:4]] == lp.topk(4).indices.tolist()
    assert got.top[0][4][1] == float("-inf")  # the fifth is cut


def test_a_grammar_mask_applies_to_its_rows_only():
    logits = logits_of(3, seed=5)

    def mask(lg: torch.Tensor, rows: list[int]) -> None:
        for r in rows:
            lg[r, 10:] = float("-inf")

    got = Sampler().sample(logits.clone(), [SampleRow(SamplingParams()) for _ in range(3)], mask, [1])
    assert got.tokens[1] == int(logits[1, :10].argmax())
    assert got.tokens[0] == int(logits[0].argmax()) and got.tokens[2] == int(logits[2].argmax())


def test_one_host_copy_per_step():
    sampler = Sampler(seed=0)
    rows = [
        SampleRow(SamplingParams(temperature=0.8, top_p=0.9, logprobs=2, presence_penalty=0.1), None, (1, 2)),
        SampleRow(SamplingParams(logit_bias=((3, 5.0),))),
        SampleRow(SamplingParams(temperature=1.0, seed=3)),
    ]
    for step in range(5):
        sampler.sample(logits_of(3, seed=step), rows)
    assert sampler.host_copies == 5


def test_prompt_logprobs_are_the_raw_models():
    logits = logits_of(4, seed=6)
    targets = [3, 9, 0, 49]
    got = prompt_logprobs(logits, targets, 2)
    lp = torch.log_softmax(logits, -1)
    for r, (value, top) in enumerate(got):
        assert math.isclose(value, float(lp[r, targets[r]]), abs_tol=1e-5)
        assert [t for t, _ in top] == lp[r].topk(2).indices.tolist()
