"""The batched sampler: every row of a step in one pass, one device-to-host copy per step.

As vLLM's ``Sampler``: the logits of all rows go through each stage as one tensor, a stage runs only
when some row uses it, and its per-row parameters are tensors, so the work per step does not grow
with how many rows use which parameters. The stages, in order (vLLM's):

1. ``logit_bias`` (added to the raw logits);
2. penalties over each row's output (presence, frequency) and prompt + output (repetition);
3. the grammar mask of structured rows (disallowed tokens to ``-inf``);
4. greedy rows take the argmax here; sampled rows are divided by their temperature,
   truncated by top-k, top-p and min-p, and draw ``argmax(p / q)`` with ``q ~ Exp(1)`` (the
   exponential race, equivalent to drawing from ``p``: no cumulative sums, no host sync). A seeded
   row draws its ``q`` from its own generator, so its tokens do not depend on the rest of the batch;
   the others share the engine's.
5. logprobs (the chosen token's and the top ``k``) from ``log_softmax`` of what the token was drawn
   from: the stages above with the temperature (1 for greedy rows).

Everything the host needs (tokens, logprobs, top ids) is packed into one float64 tensor and copied
once (``host_copies`` counts them). Token ids are exact in float64 (below 2**53).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.engine.sampling import SamplingParams

TopLogprobs = list[tuple[int, float]]


@dataclass
class SampleRow:
    """One row of a step: its parameters, its generator (None: the engine's), its output so far (for
    the penalties) and, for a repetition penalty, a ``[vocab]`` bool mask of its prompt's tokens."""

    params: SamplingParams
    generator: torch.Generator | None = None
    output: Sequence[int] = ()
    prompt_mask: torch.Tensor | None = None


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float | None]  # the chosen token's, where the row asked for logprobs
    top: list[TopLogprobs | None]  # the row's top ``params.logprobs`` alternatives


# A grammar mask applied in place: (logits, rows that are constrained).
MaskFn = Callable[[torch.Tensor, list[int]], None]


class Sampler:
    """Samples a step's rows; owns the generator unseeded rows share."""

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.host_copies = 0  # device-to-host copies so far (one per step that samples)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow], mask: MaskFn | None = None,
               masked: Sequence[int] = ()) -> SampleResult:  # fmt: skip
        """The next token of each row of ``logits [rows, vocab]`` (modified in place). ``mask(logits,
        masked)`` applies the grammar masks of rows ``masked``."""
        params = [r.params for r in rows]
        logits = logits.float()
        if any(p.logit_bias for p in params):
            self._bias(logits, params)
        penalized = [i for i, p in enumerate(params) if p.penalized]
        if penalized:
            self._penalize(logits, [rows[i] for i in penalized], penalized)
        if masked and mask is not None:
            mask(logits, list(masked))
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens, processed = logits.argmax(dim=-1), logits
        else:
            processed = self._draw_ready(logits, params)
            probs = torch.softmax(processed, dim=-1)
            q = torch.empty_like(probs).exponential_(generator=self.generator)
            for i, row in enumerate(rows):
                if row.generator is not None:
                    q[i].exponential_(generator=row.generator)
            tokens = (probs / q).argmax(dim=-1)
            if any(greedy):
                tokens = torch.where(self._tensor(greedy, torch.bool), logits.argmax(dim=-1), tokens)
        return self._to_host(tokens, processed, params)

    # ------------------------------------------------------------------------------------ stages
    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        ids = [t for p in params for t, _ in p.logit_bias]
        values = [b for p in params for _, b in p.logit_bias]
        logits.index_put_((self._tensor(rows, torch.long), self._tensor(ids, torch.long)),
                          self._tensor(values, logits.dtype), accumulate=True)  # fmt: skip

    def _penalize(self, logits: torch.Tensor, rows: list[SampleRow], index: list[int]) -> None:
        vocab = logits.shape[1]
        width = max(len(r.output) for r in rows)
        counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype, device=self.device)
        if width:  # pad with a sentinel column (vocab) that is dropped after counting
            ids = self._tensor([list(r.output) + [vocab] * (width - len(r.output)) for r in rows], torch.long)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        at = self._tensor(index, torch.long)
        sub = logits[at]
        rep = [r.params.repetition_penalty for r in rows]
        if any(p != 1.0 for p in rep):
            seen = counts > 0
            prompts = [r.prompt_mask for r in rows]
            if any(m is not None for m in prompts):
                empty = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                seen |= torch.stack([empty if m is None else m for m in prompts])
            penalty = self._tensor(rep, logits.dtype)[:, None]
            sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        freq = self._tensor([r.params.frequency_penalty for r in rows], logits.dtype)[:, None]
        presence = self._tensor([r.params.presence_penalty for r in rows], logits.dtype)[:, None]
        logits[at] = sub - freq * counts - presence * (counts > 0).to(logits.dtype)

    def _draw_ready(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Logits divided by each row's temperature (1 for greedy rows), truncated where asked."""
        temps = self._tensor([1.0 if p.greedy else p.temperature for p in params], logits.dtype)
        # Shift by the max first: a tiny temperature sends the others to -inf, never to inf - inf.
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None]
        cut = [i for i, p in enumerate(params) if p.truncated]
        if cut:
            at = self._tensor(cut, torch.long)
            scaled[at] = truncate(scaled[at], [params[i] for i in cut], self.device)
        return scaled

    # ------------------------------------------------------------------------------ to the host
    def _to_host(self, tokens: torch.Tensor, processed: torch.Tensor, params: list[SamplingParams]) -> SampleResult:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        k = max((params[i].logprobs or 0 for i in want), default=0)
        packed = torch.zeros(len(params), 2 + 2 * k, dtype=torch.float64, device=self.device)
        packed[:, 0] = tokens
        if want:
            at = self._tensor(want, torch.long)
            lp = torch.log_softmax(processed[at], dim=-1)
            packed[at, 1] = lp.gather(1, tokens[at][:, None])[:, 0].double()
            if k:
                values, ids = lp.topk(k, dim=-1)
                packed[at, 2 : 2 + k] = ids.double()
                packed[at, 2 + k :] = values.double()
        host = packed.tolist()  # the step's one device-to-host copy
        self.host_copies += 1
        out = SampleResult([int(r[0]) for r in host], [None] * len(params), [None] * len(params))
        for i in want:
            n = params[i].logprobs or 0
            out.logprobs[i] = host[i][1]
            out.top[i] = [(int(t), v) for t, v in zip(host[i][2 : 2 + n], host[i][2 + k : 2 + k + n], strict=True)]
        return out


def truncate(logits: torch.Tensor, params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    """Top-k, then top-p (the smallest set of most likely tokens whose mass reaches ``p``; always the
    most likely one), then min-p (tokens below ``min_p`` times the most likely one's probability), each
    removed token at ``-inf``; one sort for the batch (vLLM's ``apply_top_k_top_p``)."""
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    ps = [p.top_p for p in params]
    if any(k < vocab for k in ks) or any(p < 1.0 for p in ps):
        ordered, order = logits.sort(dim=-1)  # ascending
        if any(k < vocab for k in ks):
            kth = ordered.gather(1, torch.tensor([vocab - k for k in ks], device=device)[:, None])
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        if any(p < 1.0 for p in ps):
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - torch.tensor(ps, dtype=logits.dtype, device=device)[:, None]
            drop[:, -1] = False
            ordered = ordered.masked_fill(drop, float("-inf"))
        logits = ordered.scatter(1, order, ordered)
    min_ps = [p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        probs = torch.softmax(logits, dim=-1)
        floor = (
            probs.max(dim=-1, keepdim=True).values * torch.tensor(min_ps, dtype=logits.dtype, device=device)[:, None]
        )
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[tuple[float, TopLogprobs]]:
    """Per row of ``logits [m, vocab]`` (the raw model's, temperature 1): the log-probability of the
    prompt's next token ``targets[i]`` and the top ``k``; one host copy."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    cols = [lp.gather(1, t[:, None]).double()]
    if k:
        values, ids = lp.topk(k, dim=-1)
        cols += [ids.double(), values.double()]
    host = torch.cat(cols, dim=1).tolist()
    return [(r[0], [(int(i), v) for i, v in zip(r[1 : 1 + k], r[1 + k :], strict=True)]) for r in host]
