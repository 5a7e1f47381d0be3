"""The app's lifespan object: runtime, adapters, mix cache, engine, pins — built once, owned here.

It also turns what a request names (``model``, ``mix``) into a cache key and a merge to run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from merging.adapters import AdapterError, LoraAdapter
from merging.core_merge import BasisCache, dense_node
from merging.member_merge import SetFamilies, merge_members
from merging.merge import MergeError, merge_mix, mix_key
from merging.spec import AdapterLeaf, MixNode, depth, leaves, parse_mix
from server.adapters.mix_cache import CacheEntry, Lease, MergedMix, MixCache
from server.adapters.registry import NAME, AdapterRegistry
from server.config import DEMO_DIR, ServeConfig
from server.engine.engine import Engine
from server.engine.structured import StructuredOutputs
from server.entrypoints.admin_state import AdminState, canonical
from server.entrypoints.openai_shapes import TokenStrings
from server.metrics import Metrics
from server.store.state_store import StateStore, store_url
from server.worker.runtime import ModelRuntime

log = logging.getLogger("mixserve.state")
DEMO_MODEL_NAME = "mixserve-demo"


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message, offending parameter, OpenAI-style code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class ResolvedMix:
    label: str  # bounded metrics label: the base name, an adapter or pinned name, or "adhoc"
    key: str  # mix-cache key ("" for the base model alone)
    spec: AdapterLeaf | MixNode | None


@dataclass
class PinnedMix:
    name: str
    spec: AdapterLeaf | MixNode
    key: str


class ServerState:
    def __init__(self, config: ServeConfig, engine_executor: ThreadPoolExecutor | None = None) -> None:
        """Build everything; ``engine_executor``: the one thread that runs engine steps (the app builds the
        state on it, so loading and serving share torch's per-thread CPU pool)."""
        self.config = config
        dtype = getattr(torch, config.dtype)
        if torch.device(config.device).type == "cpu":
            # torch's CPU threads spin at barriers: sharing every core with the HTTP event loop, a step of
            # many small ops stalls whenever the loop takes a core (8 mixes at c=32: 2x slower measured).
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        self.runtime = ModelRuntime(
            config.model, device=config.device, dtype=dtype, max_len=config.max_len,
            kv_cache_bytes=config.kv_cache_bytes, block_size=config.block_size, max_loras=config.max_loras,
            core_slots=config.core_slots or 2 * config.max_batch, adapter_slots=config.adapter_slots,
            max_members=config.limits.max_mix_adapters, default_kv_tokens=config.max_batch * 4096,
            memory_utilization=config.memory_utilization,
            reserve_bytes=None if config.cache_bytes is None else 2 * config.cache_bytes, cuda_graphs=config.cuda_graphs,
        )  # fmt: skip
        self.base_name = config.model_name or (
            DEMO_MODEL_NAME
            if Path(config.model).resolve() == (DEMO_DIR / "base").resolve()
            else Path(config.model).name
        )
        self.metrics = Metrics(max_lora=config.max_loras)
        self.registry = AdapterRegistry(
            Path(config.adapters), self.runtime.base_shapes(), config.limits.max_adapter_bytes
        )
        self.adapter_errors = self.registry.load_root()
        self._register_lock = threading.Lock()  # registrations one at a time
        self._structured_lock = threading.Lock()
        self.token_strings = TokenStrings(self.runtime.tokenizer)  # logprobs' token texts, decoded once each
        log.info("%d adapters registered; the device adapter pool holds %d at once (--adapter-slots)",
                 len(self.registry.names()), config.adapter_slots)  # fmt: skip
        if self.runtime.graphs is not None:  # CUDA: every decode shape captured now, not on first use
            t0 = time.perf_counter()
            graphs = self.runtime.graphs.capture_buckets(config.max_batch)
            log.info("captured %d decode graphs in %.1f s", graphs, time.perf_counter() - t0)
        # What a cold merge over a known adapter set does not compute again: the set's bases and those of
        # its nodes' sub-sets (merging/member_merge.py).
        self.families, self.bases = SetFamilies(), BasisCache()
        self.update_adapter_metrics()
        self._executor = ThreadPoolExecutor(config.merge_threads, thread_name_prefix="mixserve-merge")
        # On CUDA the runtime held back a share of free memory for merged mixes, the pool and activations.
        cache_bytes = config.cache_bytes
        if cache_bytes is None:
            cache_bytes = self.runtime.reserved_bytes // 2 if self.runtime.device.type == "cuda" else 512 << 20
        self.cache = MixCache(cache_bytes, self.metrics, self._executor)
        self.engine = Engine(
            self.runtime,
            self.metrics,
            max_batch=config.max_batch,
            max_waiting=config.max_waiting,
            max_prefill_tokens=config.max_prefill_tokens,
            step_executor=engine_executor,
        )
        self.pins: dict[str, PinnedMix] = {}
        self.admin = AdminState(self, StateStore(store_url(config.state)) if config.state else None)
        self.ready = False
        self.started = time.time()

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.engine.start()
        if self.config.pin_file is not None:
            for name, spec in read_pin_file(Path(self.config.pin_file)).items():
                await self.pin(name, spec, persist=False)  # the file is configuration, not admin state
                log.info("pinned %s from %s", name, self.config.pin_file)
        await self.admin.restore()  # after the file: what an admin did last wins
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        await self.admin.stop()
        drained = await self.engine.drain(self.config.drain_seconds)
        if not drained:
            log.warning("drain deadline passed with requests in flight; aborting them")
        await self.engine.stop()
        if self.engine.structured is not None:
            self.engine.structured.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------ resolving
    def structured_outputs(self) -> StructuredOutputs:
        """The grammar compiler for the served tokenizer, built on the first structured request (xgrammar
        takes seconds to import); blocking, call it off the event loop."""
        with self._structured_lock:
            if self.engine.structured is None:
                eos = self.runtime.tokenizer.eos_token_id
                stops = [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
                self.engine.structured = StructuredOutputs(self.runtime.tokenizer, self.runtime.vocab_size, stops)
            return self.engine.structured

    def resolve(self, model: str | None, mix: dict | str | None) -> ResolvedMix:
        """What a request asks for: ``mix`` (a spec, or a name) wins over ``model``."""
        if mix is not None:
            if isinstance(mix, str):
                return self._resolve_name(mix, "mix")
            return self._resolve_spec(mix)
        if model is None or model == self.base_name:
            return ResolvedMix(self.base_name, "", None)
        return self._resolve_name(model, "model")

    def _resolve_name(self, name: str, param: str) -> ResolvedMix:
        if name == self.base_name:
            return ResolvedMix(self.base_name, "", None)
        if name in self.pins:
            pin = self.pins[name]
            return ResolvedMix(name, pin.key, pin.spec)
        if name in self.registry:
            spec = AdapterLeaf(adapter=name)
            return ResolvedMix(name, mix_key(spec, self.registry.snapshot()), spec)
        known = [self.base_name, *self.registry.names(), *sorted(self.pins)]
        raise RequestError(404, f"model {name!r} does not exist (known: {', '.join(known)})", param, "model_not_found")

    def _resolve_spec(self, raw: dict) -> ResolvedMix:
        spec = self.validate_spec(raw)
        return ResolvedMix("adhoc", mix_key(spec, self.registry.snapshot()), spec)

    def validate_spec(self, raw: dict | str) -> AdapterLeaf | MixNode:
        try:
            spec = parse_mix(raw)
        except (ValidationError, ValueError, TypeError) as exc:
            raise RequestError(400, f"invalid mix: {_short(exc)}", "mix", "invalid_mix") from None
        limits = self.config.limits
        names = [leaf.adapter for leaf in leaves(spec)]
        if len(names) > limits.max_mix_adapters:
            raise RequestError(400, f"mix has {len(names)} adapters (limit max_mix_adapters={limits.max_mix_adapters})",
                               "mix", "mix_too_large")  # fmt: skip
        if depth(spec) > limits.max_mix_depth:
            raise RequestError(400, f"mix is {depth(spec)} levels deep (limit max_mix_depth={limits.max_mix_depth})",
                               "mix", "mix_too_deep")  # fmt: skip
        unknown = sorted({n for n in names if n not in self.registry})
        if unknown:
            raise RequestError(400, f"unknown adapter(s) {', '.join(map(repr, unknown))} in mix "
                               f"(registered: {', '.join(self.registry.names())})", "mix", "unknown_adapter")  # fmt: skip
        return spec

    # --------------------------------------------------------------------------------------- merges
    async def lease(self, resolved: ResolvedMix) -> Lease | None:
        """The merged factors for ``resolved`` (merging on a miss); ``None`` for the base model."""
        if resolved.spec is None:
            return None
        try:
            return await self.cache.acquire(resolved.key, self._merge_fn(resolved.spec))
        except (MergeError, AdapterError, ValueError) as exc:
            raise RequestError(400, f"the mix cannot be merged: {exc}", "mix", "merge_failed") from None
        except MemoryError:
            raise RequestError(507, "not enough memory to merge this mix", "mix", "merge_out_of_memory") from None

    def _merge_fn(self, spec: AdapterLeaf | MixNode):
        """The merge to run for ``spec`` on the adapters as they are now: cores over its members' own
        factors (the member pool) unless a node is dense-space, else full factors (the factor pool)."""
        adapters, runtime, max_rank = self.registry.snapshot(), self.runtime, self.config.max_rank

        def merge() -> MergedMix:  # only on a cache miss, in the merge thread
            t0 = time.perf_counter()
            fallback = "a dense-space node" if dense_node(spec) else None
            if fallback is None:
                mix = merge_members(spec, adapters, max_rank=max_rank, families=self.families, bases=self.bases)
                return MergedMix(runtime.members_to_device(mix, adapters), mix.method, mix.space,
                                 time.perf_counter() - t0, mix.ranks, mix.energy_kept, path="members")  # fmt: skip
            merged = merge_mix(spec, adapters).to_lowrank(max_rank)
            factors = runtime.lora_to_device(merged.lowrank_factors())
            return MergedMix(factors, merged.method, merged.space, time.perf_counter() - t0, merged.ranks,
                             merged.energy_kept, path="factors", fallback=fallback)  # fmt: skip

        return merge

    # ----------------------------------------------------------------------------------- adapters
    def register_adapter(self, name: str, path: str, *, replace: bool = False) -> LoraAdapter:
        """Load an adapter from under the adapter root (worker thread: file I/O), record it in the state
        store, then serve it. Registering is reading it: nothing is derived for the other adapters; the
        member pool loads it when a mix first needs it. Raises ``StoreUnavailableError`` (nothing changed)."""
        with self._register_lock:
            adapter = self.registry.load(name, path, replace=replace)
            version = self.admin.write_now("put_adapter", name, self.registry.relative(path), adapter.fingerprint)
            if self.admin.newest(self.admin.adapter_versions, name, version):
                self.registry.add(adapter)
            return adapter

    def update_adapter_metrics(self) -> None:
        self.metrics.adapters_registered.set(len(self.registry.names()))
        self.metrics.observe_member_pool(self.runtime.cores)

    def check_pin_name(self, name: str) -> None:
        if not NAME.match(name):
            raise RequestError(400, f"mix name {name!r} must match {NAME.pattern}", "name")
        if name == self.base_name or name in self.registry:
            raise RequestError(409, f"{name!r} is already the name of the base model or an adapter", "name", "conflict")

    async def pin(self, name: str, raw: dict | str, *, persist: bool = True, version: int = 0) -> CacheEntry:
        """Merge now and pin under ``name`` (replacing an earlier pin of that name: the later write wins);
        with ``persist``, the state store has it before it is served (``StoreUnavailableError``: nothing
        changed); ``version``: the store version of a pin applied from the store."""
        self.check_pin_name(name)
        spec = self.validate_spec(raw)
        resolved = ResolvedMix(name, mix_key(spec, self.registry.snapshot()), spec)
        lease = await self.lease(resolved)
        assert lease is not None
        try:
            if persist:
                version = await self.admin.write("put_pin", name, raw, resolved.key)
            # Two writes of one name racing here: the store's order decides, not who gets here last.
            if self.admin.newest(self.admin.pin_versions, name, version):
                self.admin.pin_specs[name] = canonical(raw)
                if name in self.pins:
                    self.cache.unpin(name)
                self.cache.pin(lease.entry, name)
                self.pins[name] = PinnedMix(name, spec, resolved.key)
        finally:
            lease.release()
        return lease.entry

    async def unpin(self, name: str, *, persist: bool = True, version: int = 0) -> None:
        if name not in self.pins:
            raise RequestError(404, f"no pinned mix named {name!r}", "name", "not_found")
        if persist:
            version = await self.admin.write("delete_pin", name)
        if self.admin.newest(self.admin.pin_versions, name, version) and name in self.pins:
            self.admin.pin_specs.pop(name, None)
            del self.pins[name]
            self.cache.unpin(name)


def read_pin_file(path: Path) -> dict[str, dict | str]:
    """``{name: mix}`` from YAML/JSON: either a mapping of names to mixes or ``mixes: [{name, mix}]``."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and isinstance(data.get("mixes"), list):
        return {str(item["name"]): item["mix"] for item in data["mixes"]}
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    raise ValueError(f"{path}: expected a mapping of names to mixes, or 'mixes: [{{name, mix}}]'")


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'mix'}: {e['msg']}" for e in exc.errors()[:5])
    return str(exc)
