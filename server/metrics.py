"""Prometheus metrics (prefix ``mixserve_``), one registry per app: no process-global state.

Names are listed in the README (Metrics). Labels stay bounded: mixes are labelled by pinned name,
adapter name or ``adhoc``, never per request; ``lora_requests_info`` carries the label set vLLM
exports (``running_lora_adapters``, ``waiting_lora_adapters``, ``max_lora``) for LoRA-aware routers.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Fine enough to tell 1 ms from 2 ms per token, wide enough for a 7B model on CPU.
ITL_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
               0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
MERGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Every metric mixserve exports, registered in its own :class:`CollectorRegistry`."""

    def __init__(self, max_lora: int) -> None:
        r = self.registry = CollectorRegistry()
        p = "mixserve_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to first token.",
                              ["mix"], buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two generated tokens of a request.",
                             ["mix"], buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token.", ["mix"],
                             buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed.", ["mix"], registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated.", ["mix"], registry=r)
        self.store_up = Gauge(p + "state_store_up", "1 while the admin state store answers (1 with no store).",
                              registry=r)  # fmt: skip
        self.store_up.set(1)
        self.store_version = Gauge(p + "state_store_version", "The state store version this server has applied.",
                                   registry=r)  # fmt: skip
        self.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens run through the model (once for all the "
                                      "choices of a request).", registry=r)  # fmt: skip
        self.structured_requests = Counter(p + "structured_requests", "Requests with an output grammar, by kind.",
                                           ["kind"], registry=r)  # fmt: skip
        self.requests = Counter(p + "requests", "Finished requests by reason.", ["finish_reason"], registry=r)
        self.running = Gauge(p + "requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Requests waiting for admission.", registry=r)
        self.batch_size = Histogram(p + "batch_size", "Sequences per decode step.", buckets=BATCH_BUCKETS, registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Share of KV-cache blocks in use.", registry=r)
        self.merge_seconds = Histogram(p + "merge_seconds", "Time to merge a mix.", ["method", "space"],
                                       buckets=MERGE_BUCKETS, registry=r)  # fmt: skip
        self.cache_hits = Counter(p + "mix_cache_hits", "Mix cache hits.", registry=r)
        self.cache_misses = Counter(p + "mix_cache_misses", "Mix cache misses (merges started).", registry=r)
        self.cache_evictions = Counter(p + "mix_cache_evictions", "Mixes evicted from the cache.", registry=r)
        self.cache_bytes = Gauge(p + "mix_cache_bytes", "Bytes of merged factors held.", registry=r)
        self.cache_entries = Gauge(p + "mix_cache_entries", "Merged mixes held.", registry=r)
        self.cache_path_entries = Gauge(p + "mix_cache_path_entries", "Merged mixes held, by serving path "
                                        "(members: cores over the mix's adapters; factors: full factors).", ["path"],
                                        registry=r)  # fmt: skip
        self.cache_path_bytes = Gauge(p + "mix_cache_path_bytes", "Bytes of merged mixes held, by serving path.",
                                      ["path"], registry=r)  # fmt: skip
        self.merges = Counter(p + "mix_merges", "Merges run, by serving path.", ["path"], registry=r)
        self.adapters_registered = Gauge(p + "adapters_registered", "Adapters registered (host memory).", registry=r)
        self.adapter_pool_slots = Gauge(p + "adapter_pool_slots", "Adapter slots of the device member pool.",
                                        registry=r)  # fmt: skip
        self.adapter_pool_resident = Gauge(p + "adapter_pool_resident", "Adapters resident in the member pool.",
                                           registry=r)  # fmt: skip
        self.adapter_pool_in_use = Gauge(p + "adapter_pool_in_use", "Resident adapters a running sequence's mix "
                                         "reads (not evictable).", registry=r)  # fmt: skip
        self.adapter_pool_bytes = Gauge(p + "adapter_pool_bytes", "Device bytes of the member pool (adapter "
                                        "factors and loaded mix cores).", registry=r)  # fmt: skip
        self.adapter_loads = Counter(p + "adapter_pool_loads", "Adapters copied into the member pool.", registry=r)
        self.adapter_evictions = Counter(p + "adapter_pool_evictions", "Adapters evicted from the member pool "
                                         "(least recently used, idle) to make room.", registry=r)  # fmt: skip
        self._pool_counts = (0, 0)
        self.merge_failures = Counter(p + "merge_failures", "Merges that failed.", registry=r)
        self.rejected = Counter(p + "requests_rejected", "Requests refused before admission.", ["reason"],
                                registry=r)  # fmt: skip
        self.lora_info = Gauge(p + "lora_requests_info", "Running and waiting LoRA mixes (vLLM's label set).",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)  # fmt: skip
        self.max_lora = str(max_lora)
        self._lora_labels: tuple[str, str, str] | None = None

    def set_lora_info(self, running: set[str], waiting: set[str]) -> None:
        """One series at a time, as vLLM does: the value is when it was set."""
        labels = (",".join(sorted(running)), ",".join(sorted(waiting)), self.max_lora)
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def observe_member_pool(self, pool) -> None:
        """The member pool's residency (``server.adapters.member_pool.MemberPool``): gauges set, counters advanced."""
        self.adapter_pool_slots.set(pool.adapters.count)
        self.adapter_pool_resident.set(len(pool.adapters.loaded()))
        self.adapter_pool_in_use.set(pool.adapters.in_use())
        self.adapter_pool_bytes.set(pool.nbytes)
        loads, evictions = pool.adapters.loads, pool.adapters.evictions
        self.adapter_loads.inc(loads - self._pool_counts[0])
        self.adapter_evictions.inc(evictions - self._pool_counts[1])
        self._pool_counts = (loads, evictions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
