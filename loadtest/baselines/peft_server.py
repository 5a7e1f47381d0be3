"""The baseline for load tests: FastAPI + PEFT, one request at a time, switching adapters per request.

This is the "switching" approach the mixserve README argues against: the base model with every
adapter loaded in PEFT; a request names an adapter or sends a mix; the server builds the mix with
``add_weighted_adapter`` (unless it is the one already active), ``set_adapter``, and ``generate``
with a streamer, one request after another. It speaks enough of the OpenAI completions API
(streaming) for ``python -m loadtest`` to drive it.

    python -m loadtest.baselines.peft_server --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from server.config import DEMO_DIR

COMBINATION = {"linear": "cat", "task_arithmetic": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd",
               "dare_linear": "dare_linear_svd", "magnitude_prune": "magnitude_prune_svd"}  # fmt: skip


class _Streamer:
    """A transformers streamer that hands token ids to an asyncio queue (skips the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(model_dir: Path, adapters_dir: Path) -> FastAPI:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = sorted(p.name for p in adapters_dir.iterdir() if (p / "adapter_config.json").is_file())
    model = PeftModel.from_pretrained(base, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name, adapter_name=name)
    app = FastAPI(title="peft-baseline")
    lock = asyncio.Lock()  # one request at a time: the model has one active adapter
    state = {"active": None}

    def activate(mix) -> str:
        """Make ``mix`` the active adapter (building it if it is not already); returns its name."""
        if mix is None:
            return ""
        if isinstance(mix, str):
            name = mix
        else:
            name = "mix-" + hashlib.sha256(json.dumps(mix, sort_keys=True).encode()).hexdigest()[:12]
            if name != state["active"]:
                if state["active"] and state["active"].startswith("mix-"):
                    model.delete_adapter(state["active"])
                children = [c["adapter"] for c in mix["children"]]
                weights = [c.get("weight", 1.0) for c in mix["children"]]
                kwargs = {} if mix["method"] in ("linear", "task_arithmetic") else {
                    "density": mix.get("density", 1 - mix.get("drop_rate", 0.5))}  # fmt: skip
                model.add_weighted_adapter(children, weights, name, combination_type=COMBINATION[mix["method"]],
                                           **kwargs)  # fmt: skip
        model.set_adapter(name)
        state["active"] = name
        return name

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict):
        mix = body.get("mix") or (body.get("model") if body.get("model") in names else None)
        max_tokens = int(body.get("max_tokens", 16))
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def events() -> AsyncIterator[str]:
            async with lock:
                name = await asyncio.to_thread(activate, mix)
                enc = tok(body["prompt"], return_tensors="pt")
                kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=_Streamer(loop, queue),
                              pad_token_id=tok.pad_token_id)  # fmt: skip
                if body.get("ignore_eos"):
                    kwargs["min_new_tokens"] = max_tokens

                def run() -> None:
                    with torch.no_grad():
                        if name:
                            model.generate(**enc, **kwargs)
                        else:
                            with model.disable_adapter():
                                model.generate(**enc, **kwargs)

                thread = threading.Thread(target=run)
                thread.start()
                while (ids := await queue.get()) is not None:
                    chunk = {"object": "text_completion", "created": int(time.time()),
                             "choices": [{"index": 0, "text": tok.decode(ids), "finish_reason": None}]}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.to_thread(thread.join)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_DIR / "base")
    ap.add_argument("--adapters", type=Path, default=DEMO_DIR / "adapters")
    ap.add_argument("--port", type=int, default=8100)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(args.model, args.adapters), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
