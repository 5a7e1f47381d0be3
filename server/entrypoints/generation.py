"""From a validated request to a running generation: bounds, mix lease, engine submission.

Shared by the OpenAI routes and the native ``/generate``; knows HTTP only through ``Request``
(to notice a client that went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from server.engine.engine import EngineStoppedError, QueueFullError
from server.engine.sampling import MAX_LOGPROBS, SamplingParams
from server.engine.sequence import GenerationRequest, RequestHandle, TokenEvent, TokenLogprob
from server.engine.structured import GrammarError, GrammarSpec
from server.entrypoints.state import RequestError, ResolvedMix, ServerState


@dataclass
class Generation:
    handle: RequestHandle
    resolved: ResolvedMix
    prompt_tokens: int
    cache: str = "base"  # "hit" / "miss": was the merged mix already cached; "base": no mix
    merge_seconds: float | None = None  # how long the mix took to merge (when it was merged)

    def mix_info(self) -> dict:
        return {"mix": self.resolved.label, "mix_key": self.resolved.key, "cache": self.cache,
                "merge_seconds": self.merge_seconds}  # fmt: skip


def _token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.runtime.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(400, f"{param}: token ids must be in [0, {vocab}), got {bad[0]}", param)


def sampling_params(state: ServerState, *, max_tokens: int | None, temperature: float, top_p: float,
                    stop: str | list[str] | None, seed: int | None, ignore_eos: bool = False, top_k: int = 0,
                    min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0, logit_bias: dict[str, float] | None = None,
                    stop_token_ids: list[int] | None = None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, grammar=None) -> SamplingParams:  # fmt: skip
    """Checked against the server's limits and the vocabulary; raises :class:`RequestError` naming the field."""
    limits = state.config.limits
    max_tokens = limits.max_tokens if max_tokens is None else max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} is over the limit max_tokens={limits.max_tokens}",
                           "max_tokens")  # fmt: skip
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_strings:
        raise RequestError(400, f"{len(stops)} stop strings (limit max_stop_strings={limits.max_stop_strings})", "stop")
    if any(not s or len(s) > limits.max_stop_chars for s in stops):
        raise RequestError(400, f"stop strings must have 1 to {limits.max_stop_chars} characters", "stop")
    bias = tuple((int(k), float(v)) for k, v in (logit_bias or {}).items())
    _token_ids(state, [t for t, _ in bias], "logit_bias")
    _token_ids(state, list(stop_token_ids or []), "stop_token_ids")
    for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise RequestError(400, f"{name} must be in [0, {MAX_LOGPROBS}]", name)
    if grammar is not None and ignore_eos:
        raise RequestError(400, "ignore_eos cannot go with structured outputs: the grammar ends on EOS", "ignore_eos")
    return SamplingParams(max_tokens, temperature, top_p, tuple(stops), seed, ignore_eos, max(top_k, 0), min_p,
                          presence_penalty, frequency_penalty, repetition_penalty, bias, tuple(stop_token_ids or ()),
                          logprobs, prompt_logprobs, grammar)  # fmt: skip


def grammar_spec(body) -> GrammarSpec | None:
    """The one output constraint a request names (``response_format``, vLLM's ``structured_outputs`` or its
    ``guided_*`` extras), or None; two at once are refused."""
    found: list[GrammarSpec] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append(GrammarSpec("json_object", param="response_format"))
    elif rf is not None and rf.type == "json_schema":
        strict = rf.json_schema.strict is not False
        found.append(GrammarSpec("json_schema", json.dumps(rf.json_schema.schema_), strict, "response_format"))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        given = [
            k for k in ("json_", "json_object", "regex", "choice", "grammar") if getattr(so, k) not in (None, False)
        ]
        if len(given) != 1:
            raise RequestError(400, "structured_outputs takes exactly one of json, json_object, regex, choice, grammar",
                               "structured_outputs")  # fmt: skip
        found.append(_spec(given[0].rstrip("_"), getattr(so, given[0]), "structured_outputs"))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):  # fmt: skip
        value = getattr(body, name, None)
        if value is not None:
            found.append(_spec(kind, value, name))
    if len(found) > 1:
        raise RequestError(400, f"give one output constraint, not {len(found)} ({', '.join(f.param for f in found)})",
                           found[1].param)  # fmt: skip
    return found[0] if found else None


def _spec(kind: str, value, param: str) -> GrammarSpec:
    if kind == "json_object":
        return GrammarSpec("json_object", param=param)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise RequestError(400, f"{param}: the schema is not valid JSON", param) from None
        return GrammarSpec("json_schema", json.dumps(value), True, param)
    if kind == "choice":
        return GrammarSpec("choice", json.dumps(list(value)), param=param)
    return GrammarSpec(kind, value, param=param)  # regex, grammar (EBNF)


async def compile_grammar(state: ServerState, spec: GrammarSpec | None):
    """The compiled grammar (off the event loop; cached by spec), or None; a bad one is a 400."""
    if spec is None:
        return None
    try:
        structured = await asyncio.to_thread(state.structured_outputs)
        compiled = await asyncio.to_thread(structured.compile, spec)
        state.metrics.structured_requests.labels(spec.kind).inc()
        return compiled
    except GrammarError as exc:
        raise RequestError(400, str(exc), exc.param, "unsupported_schema") from None


def encode_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    """One prompt (text, or token ids checked against the vocabulary) as token ids within the limits."""
    if isinstance(prompt, list):
        ids = list(prompt)
        _token_ids(state, ids, "prompt")
    else:
        try:
            ids = state.runtime.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        except Exception:  # e.g. lone surrogates a JSON string can carry but no tokenizer can encode
            raise RequestError(400, "the prompt is not valid text (cannot be tokenized)", "prompt") from None
    limit = min(state.config.limits.max_prompt_tokens, state.runtime.max_len - 1)
    if not ids:
        raise RequestError(400, "the prompt is empty", "prompt")
    if len(ids) > limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens (limit {limit}; the context is "
                                f"{state.runtime.max_len} tokens)", "prompt", "prompt_too_long")  # fmt: skip
    return ids


async def start_generation(state: ServerState, resolved: ResolvedMix, prompt_ids: list[int],
                           params: SamplingParams, n: int = 1) -> Generation:  # fmt: skip
    """Lease the mix (merging it if needed), then queue the request; raises :class:`RequestError`."""
    arrival = time.perf_counter()
    lease = await state.lease(resolved)
    req = GenerationRequest(
        prompt_ids, params, lease.factors if lease else None, resolved.key, resolved.label,
        on_finish=lease.release if lease else None, arrival=arrival, n=n,
    )  # fmt: skip
    try:
        handle = state.engine.submit(req)
    except QueueFullError as exc:
        if lease:
            lease.release()
        state.metrics.rejected.labels("queue_full").inc()
        raise RequestError(429, f"server busy: {exc}", None, "queue_full") from None
    except EngineStoppedError as exc:
        if lease:
            lease.release()
        state.metrics.rejected.labels("draining").inc()
        raise RequestError(503, str(exc), None, "shutting_down") from None
    cache = "base" if lease is None else "hit" if lease.hit else "miss"
    return Generation(handle, resolved, len(prompt_ids), cache, lease.entry.mix.seconds if lease else None)


@dataclass
class ChoiceOutput:
    """One choice, collected: its text, its tokens and (where asked) their logprobs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cumulative_logprob: float | None = None

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        self.token_ids += event.token_ids
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
            self.cumulative_logprob = event.cumulative_logprob


async def collect_choices(gens: list[Generation], request: Request | None) -> list[list[ChoiceOutput]]:
    """Run every generation to the end (their choices by index); abort them all if the client
    (``request``; None for server-side work) disconnects meanwhile or the caller is cancelled."""

    async def watch(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        for gen in gens:
            gen.handle.abort()

    async def one(gen: Generation) -> list[ChoiceOutput]:
        choices = [ChoiceOutput(i) for i in range(gen.handle.n)]
        async for event in gen.handle.events():
            choices[event.index].add(event)
        prompt = choices[0].prompt_logprobs
        for c in choices:  # the choices forked from the first share its prompt
            c.prompt_logprobs = prompt
        return choices

    watcher = asyncio.create_task(watch(request)) if request is not None else None
    try:
        results = await asyncio.gather(*(one(g) for g in gens))
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for gen in gens:
            gen.handle.abort()  # no-op if finished; frees the slots if we were cancelled
    for choice in (c for r in results for c in r):
        if choice.finish_reason == "error":
            raise RequestError(500, f"generation failed: {choice.error}", None, "generation_failed")
    return results


async def collect(gen: Generation, request: Request | None) -> tuple[str, TokenEvent]:
    """One choice run to the end (see :func:`collect_choices`): its text and its last event."""
    ((choice,),) = await collect_choices([gen], request)
    last = TokenEvent("", [], choice.finish_reason, choice.error, choice.prompt_tokens, choice.completion_tokens)
    last.token_ids = choice.token_ids
    return choice.text, last


async def merged_events(gens: list[Generation]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """``(generation number, event)`` of several generations as they come; closing the iterator (a
    disconnected SSE client) aborts them all."""
    queue: asyncio.Queue[tuple[int, TokenEvent | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        async for event in gen.handle.events():
            queue.put_nowait((i, event))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()
        for gen in gens:
            gen.handle.abort()


async def stream(gen: Generation) -> AsyncIterator[TokenEvent]:
    """Events as they come; a disconnect (the SSE generator is closed) aborts the sequence."""
    try:
        async for event in gen.handle.events():
            yield event
    finally:
        gen.handle.abort()
