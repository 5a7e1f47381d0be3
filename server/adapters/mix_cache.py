"""The mix cache: merged low-rank factors by mix key, single-flight merges, a byte-budget LRU.

- A miss starts one merge in a worker thread; every request for the same key awaits that one
  merge (single-flight), and the event loop never blocks on tensor work.
- Entries are leased while requests use them; pinned and leased entries are never evicted.
- A merge that fails fails only the requests waiting on it; nothing is cached for it.

Only the event loop touches the bookkeeping (no locks); merges run in the executor.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from server.metrics import Metrics

Factors = Any  # the runtime's PreparedLora or PreparedMembers, or {module: (A, B)}


@dataclass
class MergedMix:
    """What a merge hands the cache: factors on the serving device plus what to report about them."""

    factors: Factors
    method: str
    space: str
    seconds: float
    ranks: dict[str, int] = field(default_factory=dict)
    energy_kept: dict[str, float] = field(default_factory=dict)
    path: str = "factors"  # "members": cores over the mix's adapters (member pool); "factors": full merged factors
    fallback: str | None = None  # why a mix took the factor path

    @cached_property
    def nbytes(self) -> int:
        if hasattr(self.factors, "nbytes"):  # the runtime's PreparedLora or PreparedMembers
            return self.factors.nbytes
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())


@dataclass
class CacheEntry:
    key: str
    mix: MergedMix
    pins: set[str] = field(default_factory=set)  # pinned names that refer to this entry
    leases: int = 0
    hits: int = 0
    created: float = field(default_factory=time.time)

    @property
    def evictable(self) -> bool:
        return not self.pins and self.leases == 0


class Lease:
    """A request's hold on a cache entry; release exactly once (idempotent)."""

    def __init__(self, cache: MixCache, entry: CacheEntry, hit: bool = False) -> None:
        self._cache, self.entry, self._released = cache, entry, False
        self.hit = hit  # the merged mix was already cached when the request asked for it

    @property
    def factors(self) -> Factors:
        return self.entry.mix.factors

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self.entry)


class MixCache:
    """LRU of merged mixes bounded by ``budget_bytes`` (pinned and leased entries excepted)."""

    def __init__(self, budget_bytes: int, metrics: Metrics, executor: Executor | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._metrics = metrics
        self._executor = executor
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self._inflight: dict[str, asyncio.Future[CacheEntry]] = {}
        self._waiters: dict[str, int] = {}  # requests awaiting each merge in flight
        self._bytes: dict[str, int] = {"core": 0, "factors": 0}  # held, by serving path (kept as entries come and go)
        self._counts: dict[str, int] = {"core": 0, "factors": 0}
        self.merges_started = 0

    # ------------------------------------------------------------------------------------- reading
    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    # ------------------------------------------------------------------------------------- leasing
    async def acquire(self, key: str, merge: Callable[[], MergedMix]) -> Lease:
        """A lease on ``key``'s entry, merging it (once, whoever asks) if it is not cached."""
        entry = self._entries.get(key)
        if entry is not None:
            self._metrics.cache_hits.inc()
            entry.hits += 1
            self._entries.move_to_end(key)
            entry.leases += 1
            return Lease(self, entry, hit=True)
        future = self._inflight.get(key)
        if future is None:
            self._metrics.cache_misses.inc()
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            asyncio.get_running_loop().create_task(self._merge(key, merge, future))
        else:
            self._metrics.cache_hits.inc()  # joined a merge in flight: no second merge
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            # shield: a cancelled waiter (client gone) must not cancel the merge others wait on.
            return Lease(self, await asyncio.shield(future))
        except asyncio.CancelledError:
            if not future.done():
                self._waiters[key] -= 1
            elif not future.cancelled() and future.exception() is None:
                self._release(future.result())  # its lease was already handed over
            raise

    async def _merge(self, key: str, merge: Callable[[], MergedMix], future: asyncio.Future) -> None:
        self.merges_started += 1
        try:
            mix = await asyncio.get_running_loop().run_in_executor(self._executor, merge)
        except BaseException as exc:
            self._metrics.merge_failures.inc()
            self._inflight.pop(key, None)
            self._waiters.pop(key, None)
            future.set_exception(exc)
            future.exception()  # retrieved: a failed merge whose waiters all left is not an error
            return
        self._metrics.merge_seconds.labels(mix.method, mix.space).observe(mix.seconds)
        self._metrics.merges.labels(mix.path).inc()
        # Every waiter's lease is taken here, before anything can evict the new entry.
        entry = CacheEntry(key, mix, leases=self._waiters.pop(key, 0))
        self._add(entry)
        self._inflight.pop(key, None)
        future.set_result(entry)
        self._evict()

    def _release(self, entry: CacheEntry) -> None:
        entry.leases -= 1
        if entry.leases == 0:
            self._evict()

    def _evict(self) -> None:
        if self.nbytes > self.budget_bytes:
            for key in [k for k, e in self._entries.items() if e.evictable]:  # LRU order
                self._remove(key)
                self._metrics.cache_evictions.inc()
                if self.nbytes <= self.budget_bytes:
                    break
        self._update_gauges()

    def _add(self, entry: CacheEntry) -> None:
        self._entries[entry.key] = entry
        self._bytes[entry.mix.path] = self._bytes.get(entry.mix.path, 0) + entry.mix.nbytes
        self._counts[entry.mix.path] = self._counts.get(entry.mix.path, 0) + 1

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes[entry.mix.path] -= entry.mix.nbytes
        self._counts[entry.mix.path] -= 1

    def _update_gauges(self) -> None:
        self._metrics.cache_bytes.set(self.nbytes)
        self._metrics.cache_entries.set(len(self._entries))
        for path, count in self._counts.items():
            self._metrics.cache_path_entries.labels(path).set(count)
            self._metrics.cache_path_bytes.labels(path).set(self._bytes[path])

    # ------------------------------------------------------------------------------------- pinning
    def pin(self, entry: CacheEntry, name: str) -> None:
        entry.pins.add(name)

    def unpin(self, name: str) -> CacheEntry | None:
        """Drop ``name``'s pin; the entry stays cached (LRU) until evicted. Returns it, if any."""
        for entry in self._entries.values():
            if name in entry.pins:
                entry.pins.discard(name)
                self._evict()
                return entry
        return None

    def clear_unpinned(self) -> int:
        """Drop every evictable entry (admin); returns how many."""
        keys = [k for k, e in self._entries.items() if e.evictable]
        for k in keys:
            self._remove(k)
        self._update_gauges()
        return len(keys)
