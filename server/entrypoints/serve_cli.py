"""``mixserve serve``: flags -> :class:`ServeConfig` -> uvicorn, with a drain on SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from server.config import DEMO_DIR, DTYPES, Limits, ServeConfig
from server.worker.model_source import ModelNotFoundError, locate_model

EPILOG = """\
examples:
  mixserve serve                                   # the embedded demo model and adapters, 127.0.0.1:8000
  mixserve serve --pin-file mixes.yaml             # pre-merge and pin named mixes at start-up
  MIXSERVE_ADMIN_TOKEN=secret mixserve serve --host 0.0.0.0 --model /models/mistral --adapters /adapters \\
      --device cuda --dtype bfloat16
  mixserve serve --model Qwen/Qwen3-8B --adapters /adapters --device cuda --dtype bfloat16
                                                   # a model id already in the local Hugging Face cache

mixes.yaml:
  code:    {method: ties, density: 0.5, children: [{adapter: python}, {adapter: pystr}]}
  sql-json: {method: linear, children: [{adapter: sql, weight: 0.6}, {adapter: json, weight: 0.4}]}
"""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the base model and merged adapter mixes over HTTP (OpenAI-compatible)",
        description="Keep a base model resident and serve merged LoRA mixes, batched together, over HTTP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d, lim = ServeConfig(), Limits()
    s.add_argument("--model", default=str(DEMO_DIR / "base"),
                   help="base model: a directory, or a Hugging Face model id already in the local cache (nothing is "
                        "downloaded; families: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3) "
                        "(default: the demo)")  # fmt: skip
    s.add_argument("--adapters", type=Path, default=DEMO_DIR / "adapters",
                   help="adapter root: every sub-directory is registered; admins can add others under it only")  # fmt: skip
    s.add_argument("--model-name", dest="model_name", help="name clients use for the base (default: its directory)")
    s.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: cpu)")
    s.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="weights and KV cache dtype (default: float32)")
    s.add_argument("--host", default=d.host, help="bind address (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=d.port, help="port (default: 8000)")
    s.add_argument("--max-batch", dest="max_batch", type=int, default=d.max_batch,
                   help=f"running sequences (default {d.max_batch})")  # fmt: skip
    s.add_argument("--max-len", dest="max_len", type=int,
                   help="longest sequence, prompt + completion, in tokens (default: the model's context; refused at "
                        "start if the KV cache cannot hold one)")  # fmt: skip
    s.add_argument("--kv-cache-mb", dest="kv_cache_mb", type=_positive(float),
                   help="paged KV-cache size in MiB (default: on CUDA what --memory-utilization leaves after the "
                        "weights and the mix reserve; on CPU room for --max-batch x 4096 tokens, at most a quarter of the "
                        "available memory)")  # fmt: skip
    s.add_argument("--block-size", dest="block_size", type=_positive(int), default=d.block_size,
                   help=f"tokens per KV-cache block (default {d.block_size})")  # fmt: skip
    s.add_argument(
        "--max-loras",
        dest="max_loras",
        type=_positive(int),
        default=d.max_loras,
        help=f"distinct factor-path mixes (dense-space merges) in the running batch: slots of the device "
        f"factor pool (default {d.max_loras})",
    )
    s.add_argument("--adapter-slots", dest="adapter_slots", type=_positive(int), default=d.adapter_slots,
                   help=f"adapters resident on the device at once, each once as its own factors and shared by every "
                        f"mix that reads it; the least recently used idle one is evicted (re-read from host memory "
                        f"when needed again). At least --max-mix-adapters (default {d.adapter_slots}; a rank-16 "
                        f"adapter of a 7B is ~84 MB in bf16)")  # fmt: skip
    s.add_argument("--core-slots", dest="core_slots", type=_positive(int),
                   help="lowrank mixes loaded on the device at once, any number of them per batch: each is a "
                        "small core over its members' factors, (sum of its adapters' ranks)^2 per module, ~1 MB for "
                        "three rank-16 adapters on a 7B in bf16 (default 2 x --max-batch)")  # fmt: skip
    s.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    s.add_argument(
        "--cpu-threads",
        dest="cpu_threads",
        type=_positive(int),
        help="CPU: torch threads for the engine (default: all cores but one, left to HTTP)",
    )
    s.add_argument("--memory-utilization", dest="memory_utilization", type=_fraction, default=d.memory_utilization,
                   help=f"CUDA: share of device memory mixserve may use (default {d.memory_utilization})")  # fmt: skip
    s.add_argument("--max-waiting", dest="max_waiting", type=int, default=d.max_waiting,
                   help=f"queued requests before answering 429 (default {d.max_waiting})")  # fmt: skip
    s.add_argument("--max-tune-jobs", dest="max_tune_jobs", type=_non_negative, default=d.max_tune_jobs,
                   help=f"background mix-tuning jobs (POST /admin/mixes/tune) at once; 0 disables them "
                        f"(default {d.max_tune_jobs})")  # fmt: skip
    s.add_argument("--max-prefill-tokens", dest="max_prefill_tokens", type=int, default=d.max_prefill_tokens,
                   help=f"prompt tokens prefilled per engine step, longer prompts go in chunks between decode "
                        f"steps (default {d.max_prefill_tokens})")  # fmt: skip
    s.add_argument("--cache-mb", dest="cache_mb", type=float,
                   help="merged-mix cache budget in MiB (default: 512 on CPU; on CUDA half of the 15%% of free "
                        "memory held back from the KV cache)")  # fmt: skip
    s.add_argument("--max-rank", dest="max_rank", type=int,
                   help="re-factor served deltas to at most this rank (default: their own rank)")  # fmt: skip
    s.add_argument("--pin-file", dest="pin_file", type=Path,
                   help="YAML of named mixes to merge and pin at start-up (default: with the demo model and "
                        "adapters, the demo's pins.yaml: its recommended all-four mix as `all-tasks`)")  # fmt: skip
    s.add_argument("--state", dest="state", default=os.environ.get("MIXSERVE_STATE"),
                   help="where pins, adapter registrations and tune results survive restarts: a SQLite file, or a "
                        "database URL shared by replicas (postgresql+psycopg://...), or 'none' (memory only); "
                        "default: $MIXSERVE_STATE, else <data dir>/mixserve/<model name>.db (printed at start)")  # fmt: skip
    s.add_argument("--api-key", dest="api_key", default=d.api_key,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /generate (default: $MIXSERVE_API_KEY; "
                        "unset = open); /health, /ready and /metrics stay open")  # fmt: skip
    s.add_argument("--insecure-admin", dest="insecure_admin", action="store_true",
                   help="allow the admin API without MIXSERVE_ADMIN_TOKEN (local use only)")  # fmt: skip
    s.add_argument("--drain-seconds", dest="drain_seconds", type=float, default=d.drain_seconds,
                   help=f"on SIGTERM, time in-flight requests get to finish (default {d.drain_seconds:g})")  # fmt: skip
    s.add_argument("--max-tokens", dest="max_tokens", type=int, default=lim.max_tokens,
                   help=f"largest max_tokens a request may ask (default {lim.max_tokens})")  # fmt: skip
    s.add_argument("--max-prompt-tokens", dest="max_prompt_tokens", type=int, default=lim.max_prompt_tokens,
                   help=f"longest prompt in tokens (default {lim.max_prompt_tokens})")  # fmt: skip
    s.add_argument("--max-mix-adapters", dest="max_mix_adapters", type=int, default=lim.max_mix_adapters,
                   help=f"adapters in one mix (default {lim.max_mix_adapters})")  # fmt: skip
    s.add_argument("--log-level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)


def default_state_path(model_name: str) -> Path:
    """``$XDG_DATA_HOME/mixserve/<model name>.db`` (``~/.local/share`` without it): one store per base model."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in model_name) or "model"
    return base / "mixserve" / f"{safe}.db"


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    try:
        model, model_id = locate_model(args.model)
    except ModelNotFoundError as exc:
        raise SystemExit(f"mixserve serve: {exc}") from None
    pin_file = args.pin_file
    if pin_file is None and model == DEMO_DIR / "base" and args.adapters == DEMO_DIR / "adapters":
        demo_pins = DEMO_DIR / "pins.yaml"
        pin_file = demo_pins if demo_pins.is_file() else None
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_mix_adapters=args.max_mix_adapters)  # fmt: skip
    if args.adapter_slots < args.max_mix_adapters:
        raise SystemExit(f"mixserve serve: --adapter-slots {args.adapter_slots} cannot hold a mix of "
                         f"--max-mix-adapters {args.max_mix_adapters} adapters; raise it or lower --max-mix-adapters")  # fmt: skip
    name = args.model_name or model_id or ("mixserve-demo" if model == DEMO_DIR / "base" else Path(model).name)
    state = args.state or str(default_state_path(name))
    return ServeConfig(
        state=None if state.lower() == "none" else state,
        model=model, adapters=args.adapters, model_name=args.model_name or model_id, device=args.device, dtype=args.dtype,
        host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len, max_waiting=args.max_waiting,
        max_tune_jobs=args.max_tune_jobs, max_prefill_tokens=args.max_prefill_tokens, max_rank=args.max_rank,
        cache_bytes=None if args.cache_mb is None else int(args.cache_mb * 2**20),
        kv_cache_bytes=None if args.kv_cache_mb is None else int(args.kv_cache_mb * 2**20),
        block_size=args.block_size, max_loras=args.max_loras, adapter_slots=args.adapter_slots,
        core_slots=args.core_slots, memory_utilization=args.memory_utilization,
        cuda_graphs=args.cuda_graphs, cpu_threads=args.cpu_threads,
        pin_file=pin_file, insecure_admin=args.insecure_admin, api_key=args.api_key, drain_seconds=args.drain_seconds, limits=limits,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace, extensions: Sequence = ()) -> int:
    """Serve until SIGTERM / SIGINT; ``extensions``: routes the calling command adds (``server.entrypoints.api.Extension``)."""
    import uvicorn

    from server.entrypoints.api import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    app = create_app(config, extensions)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=int(config.drain_seconds)))  # fmt: skip
    server.run()
    return 0


try:
    import asyncio

    import uvicorn as _uvicorn

    class DrainingServer(_uvicorn.Server):
        """SIGTERM / SIGINT drain: ``/ready`` goes false and new requests get 503 (Retry-After) at once,
        while the listener stays open so probes and clients see that; in-flight requests run to their
        end (up to ``--drain-seconds``); then uvicorn's own graceful shutdown. A second signal skips
        the drain."""

        _draining = False

        def handle_exit(self, sig, frame) -> None:
            state = getattr(self.config.app.state, "server", None) if hasattr(self.config.app, "state") else None
            if state is None or self._draining or self.should_exit:
                super().handle_exit(sig, frame)
                return
            self._draining = True
            state.ready = False
            state.engine.accepting = False
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                super().handle_exit(sig, frame)
                return
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(state, sig, frame)))

        async def _drain_then_exit(self, state, sig, frame) -> None:
            logging.getLogger("mixserve").info("draining: %d running, %d waiting",
                                               state.engine.num_running, state.engine.num_waiting)  # fmt: skip
            await state.engine.drain(state.config.drain_seconds)
            await asyncio.sleep(0.2)  # the last events reach their responses
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown (the process would die of SIGTERM);
            # a completed drain is a clean exit: status 0.
            self._captured_signals.clear()

except ImportError:  # pragma: no cover - uvicorn is a dependency; keep `mixserve merge` importable without it
    DrainingServer = None  # type: ignore[assignment,misc]
