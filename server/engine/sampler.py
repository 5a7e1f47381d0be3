"""The batched sampler: every row of a step in one pass, one device-to-host copy per step.

As vLLM's ``Sampler``: the logits of all rows go through each stage as one tensor, a stage runs only
when some row uses it, and its per-row parameters are tensors, so the work per step does not grow
with how many rows use which parameters. The stages, in order (vLLM's):

1. ``logit_bias`` (added to the raw logits);
2. penalties over each row's output (presence, frequency) and prompt + output (repetition);
3. the grammar mask of structured rows (disallowed tokens to ``-inf``);
4. greedy rows take the argmax here; sampled rows are divided by their temperature,
   truncated by top-k, top-p and min-p, and draw by inverse transform from their cumulative
   probabilities (float64) with one uniform per row, on the device (no host sync). A seeded row draws
   its uniform from its own generator, so its tokens do not depend on the rest of the batch; the
   others share the engine's.
5. logprobs (the chosen token's and the top ``k``) from ``log_softmax`` of what the token was drawn
   from: the stages above with the temperature (1 for greedy rows).

Everything the host needs (tokens, logprobs, top ids) is packed into one float64 tensor and copied
once (``host_copies`` counts them). Token ids are exact in float64 (below 2**53).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.engine.sampling import SamplingParams

TopLogprobs = list[tuple[int, float]]


@dataclass
class SampleRow:
    """One row of a step: its parameters, its generator (None: the engine's), its output so far (for
    the penalties) and, for a repetition penalty, its prompt's distinct tokens."""

    params: SamplingParams
    generator: torch.Generator | None = None
    output: Sequence[int] = ()
    prompt_tokens: frozenset[int] = frozenset()


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
        masked)`` applies the grammar masks of rows ``masked``. Each stage touches only the rows (and, for
        bias and penalties, only the tokens) that use it."""
        params = [r.params for r in rows]
        logits = logits.float()
        if any(p.logit_bias for p in params):
            self._bias(logits, params)
        if any(p.penalized for p in params):
            self._penalize(logits, rows)
        if masked and mask is not None:
            mask(logits, list(masked))
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return self._to_host(logits.argmax(dim=-1), logits, params)
        everyone = len(sampled) == len(rows)
        tokens = None if everyone else logits.argmax(dim=-1)
        at = None if everyone else self._tensor(sampled, torch.long)
        sub = self._draw_ready(logits if everyone else logits[at], [params[i] for i in sampled])
        drawn = self._draw(torch.softmax(sub, dim=-1), [rows[i].generator for i in sampled])
        if everyone:
            return self._to_host(drawn, sub, params)
        tokens[at] = drawn
        logits[at] = sub  # what the sampled rows were drawn from (their logprobs)
        return self._to_host(tokens, logits, params)

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row of ``probs`` by inverse transform: the first token whose cumulative probability
        exceeds ``u * total``, ``u ~ U(0, 1)`` from the row's own generator where it has one (a zero-
        probability token is never the first to exceed it). One random number per row, where vLLM's
        exponential race draws one per token (a million per step for 32 rows of a 32,000-token
        vocabulary)."""
        u = torch.rand(probs.shape[0], generator=self.generator, device=self.device, dtype=torch.float64)
        for j, g in enumerate(generators):
            if g is not None:
                u[j] = torch.rand((), generator=g, device=self.device, dtype=torch.float64)
        cdf = probs.double().cumsum_(dim=-1)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return drawn.clamp_(max=probs.shape[1] - 1)

    # ------------------------------------------------------------------------------------ stages
    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _bias(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        ids = [t for p in params for t, _ in p.logit_bias]
        values = [b for p in params for _, b in p.logit_bias]
        logits.index_put_((self._tensor(rows, torch.long), self._tensor(ids, torch.long)),
                          self._tensor(values, logits.dtype), accumulate=True)  # fmt: skip

    def _penalize(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
        """Repetition (over prompt and output tokens), then frequency and presence (over the output), on
        the penalized tokens only: index lists built on the host from each row's counts."""
        rep_rows, rep_ids, rep_values, pen_rows, pen_ids, pen_values = [], [], [], [], [], []
        for i, row in enumerate(rows):
            p = row.params
            if not p.penalized:
                continue
            counts = Counter(row.output)
            if p.repetition_penalty != 1.0:
                seen = sorted(row.prompt_tokens | counts.keys())
                rep_rows += [i] * len(seen)
                rep_ids += seen
                rep_values += [p.repetition_penalty] * len(seen)
            if p.frequency_penalty or p.presence_penalty:
                pen_rows += [i] * len(counts)
                pen_ids += list(counts)
                pen_values += [p.frequency_penalty * c + p.presence_penalty for c in counts.values()]
        if rep_ids:
            where = (self._tensor(rep_rows, torch.long), self._tensor(rep_ids, torch.long))
            value, penalty = logits[where], self._tensor(rep_values, logits.dtype)
            logits[where] = torch.where(value > 0, value / penalty, value * penalty)
        if pen_ids:
            where = (self._tensor(pen_rows, torch.long), self._tensor(pen_ids, torch.long))
            logits.index_put_(where, -self._tensor(pen_values, logits.dtype), accumulate=True)

    def _draw_ready(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Sampled rows' logits divided by their temperatures, truncated where asked."""
        temps = self._tensor([p.temperature for p in params], logits.dtype)
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
    removed token at ``-inf``. Rows with a top-p are sorted (vLLM's ``apply_top_k_top_p``); a top-k alone
    needs only each row's k-th value."""
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    only_k = [i for i, p in enumerate(params) if p.top_p >= 1.0 and ks[i] < vocab]
    if only_k:
        at = torch.tensor(only_k, device=device)
        top = logits[at].topk(max(ks[i] for i in only_k), dim=-1).values
        kth = top.gather(1, torch.tensor([ks[i] - 1 for i in only_k], device=device)[:, None])
        logits[at] = logits[at].masked_fill(logits[at] < kth, float("-inf"))
    if nucleus:
        at = torch.tensor(nucleus, device=device)
        ordered, order = logits[at].sort(dim=-1)  # ascending
        kth = ordered.gather(1, torch.tensor([vocab - ks[i] for i in nucleus], device=device)[:, None])
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        ps = torch.tensor([params[i].top_p for i in nucleus], dtype=logits.dtype, device=device)
        drop = cumulative <= 1 - ps[:, None]
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits[at] = torch.empty_like(ordered).scatter_(1, order, ordered)
    floors = [i for i, p in enumerate(params) if p.min_p > 0]
    if floors:
        at = torch.tensor(floors, device=device)
        probs = torch.softmax(logits[at], dim=-1)
        m = torch.tensor([params[i].min_p for i in floors], dtype=logits.dtype, device=device)[:, None]
        logits[at] = logits[at].masked_fill(probs < probs.max(dim=-1, keepdim=True).values * m, float("-inf"))
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
