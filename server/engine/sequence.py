"""What the engine keeps per request and per choice, and what it sends back.

A request (:class:`GenerationRequest`) asks for ``n`` choices of one prompt; its choices share one
:class:`ChoiceGroup` (one event queue, one abort flag, the prompt's full KV blocks). Each choice is a
:class:`Sequence` with its own sampling parameters (its seed is ``seed + index``), generator, grammar
matcher, KV blocks and detokenisation state. Events carry their choice's ``index``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from server.adapters.lora_pool import PreparedLora
from server.adapters.member_pool import PreparedMembers
from server.engine.sampler import prompt_logprobs
from server.engine.sampling import SamplingParams


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    lora: PreparedLora | PreparedMembers | None = None  # factors (factor pool) or member cores (member pool)
    mix_key: str = ""  # "" = the base model; equal keys share a side-path segment
    mix_label: str = "base"  # bounded metrics label: base, an adapter or pinned name, or "adhoc"
    on_finish: Callable[[], None] | None = None  # e.g. release the mix-cache lease (called on the loop)
    arrival: float = field(default_factory=time.perf_counter)  # set before any merge: TTFT includes it
    n: int = 1  # choices of the prompt (``n``, or ``best_of``): prefilled once, KV blocks shared


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability and the top alternatives ``[(token, logprob)]``."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0  # the choice
    logprobs: list[TokenLogprob] | None = None  # this event's generated tokens (an ending EOS included)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, before any token (None: the first)
    cumulative_logprob: float | None = None  # on the last event, where logprobs were computed


class ChoiceGroup:
    """The choices of one request: one queue for their events, one abort flag."""

    def __init__(self, n: int) -> None:
        self.n, self.unfinished = n, n
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False


@dataclass
class Sequence:
    id: int
    req: GenerationRequest
    group: ChoiceGroup
    params: SamplingParams
    index: int = 0
    blocks: list[int] = field(default_factory=list)  # KV block table (reserved for prompt + max_tokens)
    spare_blocks: list[int] = field(default_factory=list)  # the other choices' blocks, reserved at admission
    lora_slot: int = -1  # the mix's factor-pool slot while running (-1: no slots held)
    core_slot: int = 0  # the mix's member-pool slot while running
    prefilled: int = 0  # prompt tokens already in the KV cache
    tokens: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""  # decoded so far (complete characters only)
    prefix_offset: int = 0  # incremental detokenisation window, as in vLLM
    read_offset: int = 0
    last_token_time: float = 0.0
    finished: bool = False
    forked: bool = False  # its other choices were started (after its prompt was prefilled)
    generator: torch.Generator | None = None
    matcher: Any = None  # the grammar matcher of a structured request
    prompt_tokens: frozenset[int] = frozenset()  # the prompt's distinct tokens (repetition penalty)

    @property
    def cancelled(self) -> bool:
        return self.group.cancelled

    @property
    def position(self) -> int:  # tokens already in the KV cache when decoding
        return len(self.req.prompt_ids) + len(self.tokens) - 1

    def add_prompt_logprobs(self, logits: torch.Tensor, n: int) -> None:
        """The logprobs of the prompt tokens that the ``n`` positions of the chunk now being prefilled
        predict (``logits [n, vocab]``; the first token has none, the last position predicts a generated one)."""
        ids, start = self.req.prompt_ids, self.prefilled
        if start == 0:
            self.prompt_logprobs.append(None)
        stop = min(start + n, len(ids) - 1)
        if stop > start:
            targets = ids[start + 1 : stop + 1]
            for t, (lp, top) in zip(targets, prompt_logprobs(logits[: stop - start], targets, self.params.prompt_logprobs),
                                    strict=True):  # fmt: skip
                self.prompt_logprobs.append(TokenLogprob(t, lp, top))

    def append(self, token: int, logprob: TokenLogprob | None, tokenizer, eos: set[int], max_len: int
               ) -> TokenEvent | None:  # fmt: skip
        """Record one generated token: the event to send (the text it completes, or the end, with its
        ``finish_reason``), or None while the text is held back for stop matching. Raises ValueError if
        the grammar refuses the token."""
        params = self.params
        if logprob is not None:
            self.pending_logprobs.append(logprob)
            self.cumulative_logprob += logprob.logprob
        if self.matcher is not None and not self.matcher.accept_token(token):
            raise ValueError(f"the grammar rejected token {token}")
        finish = None
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            # The end: what was held back for stop matching (below) is sent now, or it would be lost.
            text, finish = self.text, "stop"
        else:
            self.tokens.append(token)
            self.pending_ids.append(token)
            text = detokenize(tokenizer, self)
        if params.stop and finish is None:
            hits = [i for i in (text.find(s, max(0, self.emitted_chars - len(s))) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and self.matcher is not None and self.matcher.is_terminated():
            finish = "stop"
        if finish is None and (len(self.tokens) >= params.max_tokens or self.position + 1 >= max_len):
            finish = "length"  # max_tokens, or the context is full
        # Hold back what could still become a stop string (incomplete UTF-8 never reaches `text`).
        hold = 0 if finish else max((len(s) - 1 for s in params.stop), default=0)
        end = max(self.emitted_chars, len(text) - hold)
        if end <= self.emitted_chars and not finish:
            return None
        delta, self.emitted_chars = text[self.emitted_chars : end], end
        ids, self.pending_ids = self.pending_ids, []
        lps, self.pending_logprobs = self.pending_logprobs, []
        return TokenEvent(delta, ids, finish, index=self.index, logprobs=lps if params.logprobs is not None else None)


class RequestHandle:
    """What a caller gets back from :meth:`Engine.submit`: the events of every choice and an abort."""

    def __init__(self, group: ChoiceGroup, abort: Callable[[ChoiceGroup], None]) -> None:
        self._group, self._abort = group, abort

    @property
    def n(self) -> int:
        return self._group.n

    def abort(self) -> None:
        self._abort(self._group)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Every choice's events (``event.index``) until each has finished."""
        left = self._group.n
        while left:
            event = await self._group.queue.get()
            yield event
            if event.finish_reason is not None:
                left -= 1


def detokenize(tokenizer, seq: Sequence) -> str:
    """The sequence's text so far, decoding only a short window of recent tokens per step: the text of
    tokens[prefix:] minus that of tokens[prefix:read] is what the new tokens add (the window's first
    token gives SentencePiece its leading-space context); an incomplete UTF-8 character waits for the
    token that completes it."""
    before = tokenizer.decode(seq.tokens[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(seq.tokens[seq.prefix_offset :], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        seq.text += after[len(before) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.tokens)
    return seq.text
