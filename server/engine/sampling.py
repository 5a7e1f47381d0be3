"""How one request generates: its sampling parameters and its random generator.

The batched choice of every row's next token is :mod:`server.engine.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): dividing fp32 logits by 1e-300 is 0 / 0.
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # OpenAI's bound on top logprobs per token


@dataclass(frozen=True)
class SamplingParams:
    """One choice's generation. ``temperature`` 0 (below 1e-5) is greedy; ``top_k`` 0 is off.

    Penalties as vLLM and OpenAI define them: ``presence_penalty`` and ``frequency_penalty`` subtract
    ``p * (count > 0)`` and ``f * count`` of the tokens generated so far; ``repetition_penalty`` divides a
    positive logit (multiplies a negative one) of any token in the prompt or the output (CTRL's rule).
    ``logit_bias`` adds to chosen logits before everything else. ``logprobs``: how many top alternatives
    to return per generated token (None: no logprobs; 0: the chosen token's only); ``prompt_logprobs``:
    the same for the prompt's tokens (echo). ``grammar``: a compiled grammar (:mod:`server.engine.structured`)
    the output must follow. ``max_tokens`` 0 only prefills (echo with logprobs)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncated(self) -> bool:
        """Whether top-k, top-p or min-p remove tokens (a sampled row only)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    def for_choice(self, index: int) -> SamplingParams:
        """Choice ``index`` of ``n``: its own seed (``seed + index``, as vLLM's parallel sampling), so
        every choice of a seeded request is reproducible and the choices differ."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for a seeded request on ``device`` (its noise depends on its seed only, so it samples
    the same tokens whatever its batch); None for unseeded and greedy ones (they share the engine's)."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g
