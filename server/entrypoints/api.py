"""The FastAPI app: lifespan (load the model in the background), error shapes, health, metrics,
native ``/generate``; the OpenAI and admin routes live in their own modules."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ServeConfig
from server.entrypoints import routes_admin, routes_openai, routes_playground
from server.entrypoints.auth import require_api_key
from server.entrypoints.generation import collect, encode_prompt, sampling_params, start_generation, stream
from server.entrypoints.routes_openai import StateDep
from server.entrypoints.schemas import GenerateRequest, error_body
from server.entrypoints.state import RequestError, ServerState
from server.metrics import CONTENT_TYPE
from server.store.state_store import StoreUnavailableError

log = logging.getLogger("mixserve.api")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class Extension(Protocol):
    """Routes and a lifecycle that the command serving the app adds to it (``mixserve serve`` adds tune jobs,
    ``mixserve/tune_jobs.py``): the server imports nothing of them."""

    router: APIRouter  # mounted before the built-in routes (its paths win over their patterns)

    def attach(self, state: ServerState) -> None:
        """Called once the model is loaded, before the server is ready."""

    async def shutdown(self) -> None:
        """Called first when the app stops, before the engine drains."""


def create_app(config: ServeConfig, extensions: Sequence[Extension] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = None
        app.state.load_error = None
        # One thread loads the model and then runs every engine step (see Engine).
        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="mixserve-engine")

        async def load() -> None:
            try:
                state = await asyncio.get_running_loop().run_in_executor(engine_thread, ServerState, config,
                                                                         engine_thread)  # fmt: skip
                for extension in extensions:
                    extension.attach(state)
                await state.start()
                app.state.server = state
                log.info("ready: %s (context %d tokens, prompt + completion), adapters %s, pins %s", state.base_name,
                         state.runtime.max_len, state.registry.names(), sorted(state.pins))  # fmt: skip
            except Exception as exc:  # keep /health answering and say why /ready stays false
                log.exception("start-up failed")
                app.state.load_error = f"{type(exc).__name__}: {exc}"

        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if app.state.server is not None:
            for extension in extensions:
                await extension.shutdown()
            await app.state.server.shutdown()
        engine_thread.shutdown(wait=False)

    app = FastAPI(title="mixserve", version="0.1.0", lifespan=lifespan)
    app.state.config = config
    for extension in extensions:
        app.include_router(extension.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_playground.router)
    _install_errors(app)

    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        state = request.app.state.server
        if state is None or not state.ready:
            # Unauthenticated: the reason names files without the server's directories (full text in the log).
            reason = redact_paths(request.app.state.load_error or ("shutting down" if state else "loading"))
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return {"ready": True, "model": state.base_name, "adapters": state.registry.names(), "pins": sorted(state.pins),
                "store": state.admin.view()}  # fmt: skip

    @app.get("/metrics")
    async def metrics(state: StateDep):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/generate", dependencies=[Depends(require_api_key)])
    async def generate(body: GenerateRequest, request: Request, state: StateDep):
        resolved = state.resolve(None, body.mix)
        params = sampling_params(state, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 stop=body.stop, seed=body.seed, ignore_eos=body.ignore_eos)  # fmt: skip
        gen = await start_generation(state, resolved, encode_prompt(state, body.prompt), params)
        if body.stream:

            async def events() -> AsyncIterator[str]:
                async for ev in stream(gen):
                    out = {"text": ev.text, "token_ids": ev.token_ids, "finish_reason": ev.finish_reason}
                    if ev.finish_reason:
                        out.update(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                   **gen.mix_info())  # fmt: skip
                        if ev.error:
                            out["error"] = ev.error
                    yield f"data: {json.dumps(out)}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, last = await collect(gen, request)
        return {"text": text, "finish_reason": last.finish_reason, **gen.mix_info(),
                "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens}  # fmt: skip

    return app


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, declared (Content-Length) or streamed
    (chunked): the body is never read past the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(send)
            return
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLargeError(413, f"request body over the limit max_body_bytes={self.limit}")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await self._reject(send)

    async def _reject(self, send) -> None:
        response = JSONResponse(error_body(f"request body over the limit max_body_bytes={self.limit}",
                                           "invalid_request_error", None, "body_too_large"), status_code=413)  # fmt: skip
        await response({"type": "http"}, None, send)


class _BodyTooLargeError(StarletteHTTPException):
    """An HTTPException, so the route layer answers it (413) even while it parses the body."""


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\":,()]+/)+([^\s/'\":,()]*)")


def redact_paths(text: str) -> str:
    """Absolute filesystem paths in ``text`` cut down to their last component (``.../model.safetensors``)."""
    return _ABS_PATH.sub(lambda m: ".../" + m.group(1), text)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        # The reason, never the request's text: messages name fields and limits only.
        log.info("refused %s %s: %d %s (%s)", request.method, request.url.path, exc.status, exc.message, exc.param)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        body = error_body(exc.message, _TYPES.get(exc.status, "server_error"), exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(request: Request, exc: StoreUnavailableError):
        log.warning("refused %s %s: 503 %s", request.method, request.url.path, exc)
        body = error_body(f"{exc}; nothing was changed", "server_error", None, "store_unavailable")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]

        def say(e: dict) -> str:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            if e.get("type") == "extra_forbidden":  # an unknown field: refused, never silently ignored
                return f"{where}: unknown field (this endpoint does not take it; the README lists every field)"
            return f"{where}: {e.get('msg')}"

        msg = "; ".join(say(e) for e in errors[:5])
        log.info("refused %s %s: 400 %s", request.method, request.url.path, msg)
        return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = "body_too_large" if isinstance(exc, _BodyTooLargeError) else None
        body = error_body(str(exc.detail), _TYPES.get(exc.status_code, "server_error"), None, code)
        return JSONResponse(body, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error", None, "internal_error"), 500)
