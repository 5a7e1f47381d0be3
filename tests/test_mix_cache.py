"""MixCache: single-flight merges, byte-budget LRU, pinned and leased entries survive, failures are not cached."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.adapters.mix_cache import MergedMix, MixCache
from server.metrics import Metrics


def _mix(nbytes: int) -> MergedMix:
    n = nbytes // 4  # A [1, n] and B [1, 1] in float32
    return MergedMix({"m": (torch.zeros(1, n), torch.zeros(1, 1))}, "linear", "lowrank", 0.01)


def _bytes(n: int) -> int:
    return _mix(n).nbytes


class CountingMerge:
    def __init__(self, nbytes: int = 800, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls, self.nbytes, self.gate, self.fail = 0, nbytes, gate, fail

    def __call__(self) -> MergedMix:
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail:
            raise ValueError("bad mix")
        return _mix(self.nbytes)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_for_one_key_share_one_merge():
    async def main():
        cache = MixCache(10**9, Metrics(max_lora=4))
        gate = threading.Event()
        merge = CountingMerge(gate=gate)
        tasks = [asyncio.create_task(cache.acquire("k", merge)) for _ in range(10)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)  # all waiting on the one merge
        gate.set()
        leases = await asyncio.gather(*tasks)
        assert merge.calls == 1
        assert len({id(lease.entry) for lease in leases}) == 1 and leases[0].entry.leases == 10
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        assert cache.get("k").leases == 0
        hits = cache._metrics.cache_hits._value.get()
        misses = cache._metrics.cache_misses._value.get()
        assert (hits, misses) == (9, 1)

    run(main())


def test_lru_evicts_by_bytes_but_never_pinned_or_leased():
    async def main():
        one = _bytes(800)
        cache = MixCache(3 * one, Metrics(max_lora=4))
        pinned = await cache.acquire("pinned", CountingMerge())
        cache.pin(pinned.entry, "hot")
        pinned.release()
        held = await cache.acquire("held", CountingMerge())  # stays leased
        for key in ("a", "b", "c"):
            (await cache.acquire(key, CountingMerge())).release()
        keys = [e.key for e in cache.entries()]
        assert "pinned" in keys and "held" in keys and cache.nbytes <= 3 * one
        assert keys[-1] == "c" and "a" not in keys and "b" not in keys  # least recently used went first
        held.release()
        (await cache.acquire("d", CountingMerge())).release()
        assert {e.key for e in cache.entries()} == {"pinned", "c", "d"}  # released "held" was now the LRU
        # Unpinned, it becomes an ordinary LRU entry and can go.
        cache.unpin("hot")
        for key in ("e", "f", "g"):
            (await cache.acquire(key, CountingMerge())).release()
        assert "pinned" not in {e.key for e in cache.entries()}

    run(main())


def test_a_failed_merge_fails_its_waiters_only_and_is_retried():
    async def main():
        cache = MixCache(10**9, Metrics(max_lora=4))
        gate = threading.Event()
        bad = CountingMerge(gate=gate, fail=True)
        waiters = [asyncio.create_task(cache.acquire("bad", bad)) for _ in range(3)]
        good = await cache.acquire("good", CountingMerge())
        gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results) and bad.calls == 1
        assert cache.get("bad") is None and cache.get("good") is not None
        retry = CountingMerge()
        lease = await cache.acquire("bad", retry)  # not cached as failed: merged again
        assert retry.calls == 1 and lease.entry.key == "bad"
        good.release()
        lease.release()

    run(main())


def test_a_cancelled_waiter_does_not_cancel_the_merge_or_leak_a_lease():
    async def main():
        cache = MixCache(10**9, Metrics(max_lora=4))
        gate = threading.Event()
        merge = CountingMerge(gate=gate)
        leaving = asyncio.create_task(cache.acquire("k", merge))
        staying = asyncio.create_task(cache.acquire("k", merge))
        await asyncio.sleep(0.02)
        leaving.cancel()
        gate.set()
        lease = await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert merge.calls == 1 and lease.entry.leases == 1
        lease.release()
        assert lease.entry.leases == 0

    run(main())
