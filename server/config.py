"""Server configuration: what to load, how much memory to use, and every request bound."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Limits:
    """Bounds on what one request may ask for; past them the API answers 4xx naming the limit."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_mix_adapters: int = 16
    max_mix_depth: int = 4
    max_body_bytes: int = 1 << 20
    max_adapter_bytes: int = 4 << 30  # an adapter's safetensors file (checked before it is read)


@dataclass
class ServeConfig:
    model: Path = DEMO_DIR / "base"
    adapters: Path = DEMO_DIR / "adapters"  # the adapter root: nothing is loaded from outside it
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # running sequences
    max_len: int | None = None  # longest sequence, prompt + completion (default: the model's context)
    max_waiting: int = 256  # queued requests before 429
    max_tune_jobs: int = 1  # background mix-tuning jobs at once (409 past it)
    max_prefill_tokens: int = 512  # prompt tokens per engine step; longer prompts are chunked
    kv_cache_bytes: int | None = (
        None  # paged KV pool (default: CUDA a share of free memory; CPU max_batch x 4096 tokens)
    )
    block_size: int = 16  # tokens per KV block
    max_loras: int = 8  # distinct factor-path mixes in the running batch (slots of the device mix pool)
    # Adapters resident on the device at once, as their own factors, shared by every mix that reads them
    # (least recently used evicted; at least limits.max_mix_adapters).
    adapter_slots: int = 32
    core_slots: int | None = None  # lowrank mixes' cores loaded at once (default: 2 x max_batch)
    memory_utilization: float = 0.9  # CUDA: share of device memory for weights, KV cache and mixes
    cuda_graphs: bool = True  # CUDA: decode steps replay captured graphs
    # CPU: torch threads for the engine (default: all cores but one, left to HTTP and tokenization).
    cpu_threads: int | None = None
    # Merged-mix LRU budget (pinned mixes count but are never evicted); default: CPU 512 MiB, CUDA a
    # share of what the weights leave free.
    cache_bytes: int | None = None
    max_rank: int | None = None  # re-factor served deltas to at most this rank (default: their own)
    merge_threads: int = 1
    pin_file: Path | None = None
    # The admin state store (pins, registrations, tune results): a SQLite path or a database URL
    # (postgresql+psycopg://...); None keeps them in memory only (`mixserve serve` defaults to a file).
    state: str | None = None
    admin_token: str | None = field(default_factory=lambda: os.environ.get("MIXSERVE_ADMIN_TOKEN") or None)
    insecure_admin: bool = False
    # vLLM's convention: when set, /v1/* and /generate need 'Authorization: Bearer <key>'.
    api_key: str | None = field(default_factory=lambda: os.environ.get("MIXSERVE_API_KEY") or None)
    model_name: str | None = None  # the name clients use for the base model (default: its directory)
    drain_seconds: float = 30.0
    limits: Limits = field(default_factory=Limits)

    def __repr__(self) -> str:  # never print the token or the key
        shown = {k: v for k, v in self.__dict__.items() if k not in ("admin_token", "api_key")}
        return f"ServeConfig({shown}, admin_token={'set' if self.admin_token else 'unset'}, api_key={'set' if self.api_key else 'unset'})"
