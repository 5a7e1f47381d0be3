"""From a validated request to a running generation: bounds, mix lease, engine submission.

Shared by the OpenAI routes and the native ``/generate``; knows HTTP only through ``Request``
(to notice a client that went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from server.engine.engine import EngineStoppedError, GenerationRequest, QueueFullError, RequestHandle, TokenEvent
from server.engine.sampling import SamplingParams
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


def sampling_params(state: ServerState, *, max_tokens: int | None, temperature: float, top_p: float,
                    stop: str | list[str] | None, seed: int | None, ignore_eos: bool = False) -> SamplingParams:  # fmt: skip
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
    return SamplingParams(max_tokens, temperature, top_p, tuple(stops), seed, ignore_eos)


def encode_prompt(state: ServerState, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        vocab = state.runtime.embed.shape[0]
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        try:
            ids = state.runtime.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        except Exception:  # e.g. lone surrogates a JSON string can carry but no tokenizer can encode
            raise RequestError(400, "the prompt is not valid text (cannot be tokenized)", "prompt") from None
    limit = min(state.config.limits.max_prompt_tokens, state.runtime.max_len - 1)
    if not ids:
        raise RequestError(400, "the prompt is empty", "prompt")
    if len(ids) > limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens (limit {limit})", "prompt", "prompt_too_long")
    return ids


async def start_generation(state: ServerState, resolved: ResolvedMix, prompt_ids: list[int],
                           params: SamplingParams) -> Generation:  # fmt: skip
    """Lease the mix (merging it if needed), then queue the request; raises :class:`RequestError`."""
    arrival = time.perf_counter()
    lease = await state.lease(resolved)
    req = GenerationRequest(
        prompt_ids, params, lease.factors if lease else None, resolved.key, resolved.label,
        on_finish=lease.release if lease else None, arrival=arrival,
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


async def collect(gen: Generation, request: Request | None) -> tuple[str, TokenEvent]:
    """Run to the end; abort if the client (``request``; None for server-side work) disconnects meanwhile,
    or if the caller is cancelled. Returns the text and the last event."""
    parts: list[str] = []

    async def watch(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        gen.handle.abort()

    watcher = asyncio.create_task(watch(request)) if request is not None else None
    try:
        last = None
        async for event in gen.handle.events():
            parts.append(event.text)
            last = event
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        gen.handle.abort()  # no-op if finished; frees the slot if we were cancelled
    assert last is not None
    if last.finish_reason == "error":
        raise RequestError(500, f"generation failed: {last.error}", None, "generation_failed")
    return "".join(parts), last


async def stream(gen: Generation) -> AsyncIterator[TokenEvent]:
    """Events as they come; a disconnect (the SSE generator is closed) aborts the sequence."""
    try:
        async for event in gen.handle.events():
            yield event
    finally:
        gen.handle.abort()
