"""Sampling parameters and the choice of the next token (greedy, temperature, nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): dividing fp32 logits by 1e-300 is 0 / 0.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. ``temperature`` 0 (below 1e-5) is greedy (and then ``seed`` is irrelevant)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator per request: a seeded request samples the same tokens whatever its batch."""
    if params.temperature < GREEDY_BELOW:
        return None
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from fp32 ``logits [vocab]``."""
    if params.temperature < GREEDY_BELOW or generator is None:
        return int(torch.argmax(logits))
    # Shift by the max before dividing: a tiny temperature sends the others to -inf, never to inf - inf.
    logits = logits.float().cpu()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
