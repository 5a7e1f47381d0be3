"""``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and ``/v1/models/{id}`` in the OpenAI shapes.

Routes only translate: a request's fields become sampling parameters (``generation.py``, which checks
them), one engine request per prompt with its ``n`` (or ``best_of``) choices, and the collected or
streamed events become OpenAI's choices (``openai_shapes.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.entrypoints.auth import require_api_key
from server.entrypoints.generation import (
    ChoiceOutput,
    Generation,
    collect_choices,
    compile_grammar,
    encode_prompt,
    grammar_spec,
    merged_events,
    sampling_params,
    start_generation,
)
from server.entrypoints.openai_shapes import (
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    finish,
    usage,
)
from server.entrypoints.schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from server.entrypoints.state import RequestError, ServerState

# Router-level, so a missing key is answered (401) before anything else, even while the model loads.
router = APIRouter(dependencies=[Depends(require_api_key)])


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise RequestError(503, "the model is still loading", None, "loading")
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _params(state: ServerState, body, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
            grammar):  # fmt: skip
    return sampling_params(
        state, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
        ignore_eos=body.ignore_eos, top_k=body.top_k, min_p=body.min_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias, stop_token_ids=body.stop_token_ids, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, grammar=grammar,
    )  # fmt: skip


async def _start_all(state: ServerState, body, prompts: list[list[int]], params, n: int) -> list[Generation]:
    resolved = state.resolve(body.model, body.mix)
    gens: list[Generation] = []
    try:
        for ids in prompts:
            gens.append(await start_generation(state, resolved, ids, params, n))
    except BaseException:
        for gen in gens:  # all or nothing: a later prompt refused aborts the earlier ones
            gen.handle.abort()
        raise
    return gens


# -------------------------------------------------------------------------------------- completions
def _check_completion(body: CompletionRequest) -> int:
    """Refusals that name the field; returns the choices generated per prompt (``best_of`` or ``n``)."""
    if body.suffix:
        raise RequestError(400, "suffix is not supported: no fill-in-the-middle", "suffix", "unsupported")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise RequestError(400, f"best_of ({best_of}) must be at least n ({body.n})", "best_of")
    if best_of > body.n and body.stream:
        raise RequestError(400, "best_of > n cannot stream (the best choices are known at the end)", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise RequestError(400, "max_tokens 0 needs echo (the prompt's logprobs are then the answer)", "max_tokens")
    if len(body.prompt) * best_of > MAX_CHOICES:
        raise RequestError(400, f"{len(body.prompt)} prompts x {best_of} choices is over {MAX_CHOICES}", "n")
    return best_of


def _best(choices: list[ChoiceOutput], n: int) -> list[ChoiceOutput]:
    """OpenAI's ``best_of``: the ``n`` choices with the highest log-probability per token."""
    if len(choices) == n:
        return choices
    return sorted(choices, key=lambda c: -(c.cumulative_logprob or 0.0) / max(1, len(c.logprobs or ())))[:n]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep):
    best_of = _check_completion(body)
    k, echo, generates = body.logprobs, body.echo, body.max_tokens != 0
    grammar = await compile_grammar(state, grammar_spec(body))
    internal = k if k is not None else (0 if best_of > body.n else None)  # best_of ranks by logprob
    params = _params(state, body, body.max_tokens, internal if generates else None,
                     k if echo and k is not None else None, grammar)  # fmt: skip
    prompts = [encode_prompt(state, p) for p in body.prompt]
    texts = [p if isinstance(p, str) else state.runtime.tokenizer.decode(p) for p in body.prompt]
    gens = await _start_all(state, body, prompts, params, best_of if generates else 1)
    rid, created, strings = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.token_strings

    prompt_tokens = sum(map(len, prompts))
    running = {"completion": 0}  # tokens streamed so far (continuous usage)

    def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        out = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
               "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}  # fmt: skip
        if body.stream_options is not None and body.stream_options.continuous_usage_stats:
            out["usage"] = usage(prompt_tokens, running["completion"])
        return out

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            offsets, done = {}, 0
            if echo and k is None:
                for p, text in enumerate(texts):
                    for j in range(body.n):
                        yield _sse(chunk(p * body.n + j, text, None, None))
            async for p, ev in merged_events(gens):
                running["completion"] += len(ev.token_ids)
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                    break
                copies = range(body.n) if not generates else (ev.index,)  # max_tokens 0: one choice stands for n
                if ev.prompt_logprobs is not None:
                    lp = echo_logprobs(prompts[p], ev.prompt_logprobs, [], strings)
                    for j in range(body.n):
                        offsets[p * body.n + j] = len(texts[p])
                        yield _sse(chunk(p * body.n + j, texts[p], lp, None))
                if ev.text or ev.finish_reason or ev.logprobs:
                    for j in copies:
                        index = p * body.n + j
                        lp = None
                        if k is not None and ev.logprobs is not None:
                            lp = completion_logprobs(ev.logprobs, strings, offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
                        yield _sse(chunk(index, ev.text, lp, finish(ev.finish_reason)))
                if ev.finish_reason:
                    done += ev.completion_tokens
            if include_usage:
                yield _sse({**chunk(0, "", None, None), "choices": [], "usage": usage(prompt_tokens, done)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    results = await collect_choices(gens, request)
    choices = []
    for p, res in enumerate(results):
        picked = _best(res, body.n) if generates else res * body.n
        for j, c in enumerate(picked):
            logprobs = None
            if k is not None:
                logprobs = (echo_logprobs(prompts[p], c.prompt_logprobs or [], c.logprobs or [], strings) if echo
                            else completion_logprobs(c.logprobs or [], strings))  # fmt: skip
            choices.append({"index": p * body.n + j, "text": (texts[p] if echo else "") + c.text,
                            "logprobs": logprobs, "finish_reason": finish(c.finish_reason)})  # fmt: skip
    generated = sum(c.completion_tokens for res in results for c in res)
    return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": usage(sum(map(len, prompts)), generated)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- chat
def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> str:
    """The model's chat template if it has one; otherwise the messages' text, one per line (the demo
    model has no template: its task prompts are sent as the content of one user message)."""
    tok = state.runtime.tokenizer
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in body.messages]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages)


def _check_chat(body: ChatCompletionRequest) -> int | None:
    """Refusals that name the field; returns the top logprobs asked (None: no logprobs)."""
    if body.tools or body.functions:
        field = "tools" if body.tools else "functions"
        raise RequestError(400, "tool calling is not supported: send the tools' descriptions in the messages",
                           field, "unsupported")  # fmt: skip
    for field in ("tool_choice", "function_call"):
        if getattr(body, field) not in (None, "none"):
            raise RequestError(400, f"{field} is not supported: there are no tools", field, "unsupported")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    top = _check_chat(body)
    grammar = await compile_grammar(state, grammar_spec(body))
    params = _params(state, body, body.max_completion_tokens or body.max_tokens, top, None, grammar)
    prompt = encode_prompt(state, chat_prompt(state, body))
    (gen,) = await _start_all(state, body, [prompt], params, body.n)
    rid, created, strings = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.token_strings
    head = {"id": rid, "created": created, "model": body.model}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        running = {"completion": 0}  # tokens streamed so far (continuous usage)

        def chunk(index: int, delta: dict, reason: str | None, logprobs: dict | None = None) -> dict:
            out = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}  # fmt: skip
            if body.stream_options is not None and body.stream_options.continuous_usage_stats:
                out["usage"] = usage(len(prompt), running["completion"])
            return out

        async def events() -> AsyncIterator[str]:
            done = 0
            for j in range(body.n):
                yield _sse(chunk(j, {"role": "assistant", "content": ""}, None))
            async for _, ev in merged_events([gen]):
                running["completion"] += len(ev.token_ids)
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                    break
                lp = chat_logprobs(ev.logprobs, strings, top) if top is not None and ev.logprobs else None
                if ev.text or lp:
                    yield _sse(chunk(ev.index, {"content": ev.text}, None, lp))
                if ev.finish_reason:
                    done += ev.completion_tokens
                    yield _sse(chunk(ev.index, {}, finish(ev.finish_reason)))
            if include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage(len(prompt), done)})  # fmt: skip
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    (res,) = await collect_choices([gen], request)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs or [], strings, top) if top is not None else None,
                "finish_reason": finish(c.finish_reason)} for c in res]  # fmt: skip
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(prompt), sum(c.completion_tokens for c in res))}  # fmt: skip


# -------------------------------------------------------------------------------------------- models
def _model_cards(state: ServerState) -> list[dict]:
    created, context = int(state.started), state.runtime.max_len
    base = {"id": state.base_name, "object": "model", "created": created, "owned_by": "mixserve",
            "root": state.base_name, "parent": None, "max_model_len": context}  # fmt: skip

    def child(name: str, kind: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "mixserve", "root": name,
                "parent": state.base_name, "kind": kind, "max_model_len": context}  # fmt: skip

    return ([base] + [child(n, "adapter") for n in state.registry.names()]
            + [child(n, "pinned_mix") for n in sorted(state.pins)])  # fmt: skip


@router.get("/v1/models")
async def models(state: StateDep):
    return {"object": "list", "data": _model_cards(state)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: StateDep):
    for card in _model_cards(state):
        if card["id"] == model_id:
            return card
    raise RequestError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
