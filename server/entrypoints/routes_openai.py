"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` in the OpenAI shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.entrypoints.auth import require_api_key
from server.entrypoints.generation import Generation, collect, encode_prompt, sampling_params, start_generation, stream
from server.entrypoints.schemas import ChatCompletionRequest, CompletionRequest
from server.entrypoints.state import RequestError, ServerState

# Router-level, so a missing key is answered (401) before anything else, even while the model loads.
router = APIRouter(dependencies=[Depends(require_api_key)])


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise RequestError(503, "the model is still loading", None, "loading")
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def _check_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.logprobs not in (None, False, 0):
        raise RequestError(400, "logprobs is not supported", "logprobs", "unsupported")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _start(state: ServerState, body, prompt_ids: list[int], max_tokens: int | None) -> Generation:
    resolved = state.resolve(body.model, body.mix)
    params = sampling_params(state, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                             stop=body.stop, seed=body.seed, ignore_eos=body.ignore_eos)  # fmt: skip
    return await start_generation(state, resolved, prompt_ids, params)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep):
    _check_unsupported(body)
    gen = await _start(state, body, encode_prompt(state, body.prompt), body.max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            async for ev in stream(gen):
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                    break
                if ev.text or ev.finish_reason:
                    yield _sse(chunk(ev.text, _finish(ev.finish_reason)))
                if ev.finish_reason and include_usage:
                    yield _sse(
                        {**chunk("", None), "choices": [], "usage": _usage(ev.prompt_tokens, ev.completion_tokens)}
                    )
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    text, last = await collect(gen, request)
    return {**chunk(text, _finish(last.finish_reason)), "usage": _usage(last.prompt_tokens, last.completion_tokens)}


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> str:
    """The model's chat template if it has one; otherwise the messages' text, one per line (the demo
    model has no template: its task prompts are sent as the content of one user message)."""
    tok = state.runtime.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep):
    _check_unsupported(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    gen = await _start(state, body, encode_prompt(state, chat_prompt(state, body)), max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": body.model}

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            async for ev in stream(gen):
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                    break
                if ev.text:
                    yield _sse(chunk({"content": ev.text}, None))
                if ev.finish_reason:
                    yield _sse(chunk({}, _finish(ev.finish_reason)))
                    if include_usage:
                        usage = _usage(ev.prompt_tokens, ev.completion_tokens)
                        yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    text, last = await collect(gen, request)
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish(last.finish_reason),
            }
        ],
        "usage": _usage(last.prompt_tokens, last.completion_tokens),
    }


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


@router.get("/v1/models")
async def models(state: StateDep):
    created = int(state.started)
    base = {"id": state.base_name, "object": "model", "created": created, "owned_by": "mixserve",
            "root": state.base_name, "parent": None}  # fmt: skip

    def child(name: str, kind: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "mixserve", "root": name,
                "parent": state.base_name, "kind": kind}  # fmt: skip

    data = [base] + [child(n, "adapter") for n in state.registry.names()]
    data += [child(n, "pinned_mix") for n in sorted(state.pins)]
    return {"object": "list", "data": data}
