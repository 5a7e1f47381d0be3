"""The admin state kept in the store (``server/store``) and the server's memory in step.

- **Writes go to the store first** (a registration, a pin, an unpin): the admin call answers once the
  store has it; if the store is unreachable it answers 503 with the reason and memory is not changed.
- **Start-up restores** the store's registrations and pins before ``/ready`` (after the pin file: what
  an admin did last wins); a pin that cannot be restored (an adapter gone, changed or failing to merge)
  is kept in the store and reported in ``GET /admin/mixes`` and the log, and never blocks the others.
- **Following**: a background task polls the store's version (``poll_seconds``) and applies what
  another replica changed, so a pin taken anywhere is served everywhere; while the store is down,
  generation goes on and the task retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from merging.adapters import AdapterError, LoraAdapter
from server.store.state_store import Snapshot, StateStore, StoreUnavailableError, redact

log = logging.getLogger("mixserve.state")


def canonical(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True)


class AdminState:
    """What the store holds, applied to one server (``ServerState``) and kept in step."""

    def __init__(self, state: Any, store: StateStore | None, poll_seconds: float = 0.5) -> None:
        """``state``: the server's ``ServerState`` (its registry, pins, ``pin`` / ``unpin`` and metrics)."""
        self._state, self.store, self.poll_seconds = state, store, poll_seconds
        self.version = 0  # the store version this server has applied
        self.reachable = store is not None
        self.last_contact = time.time()
        self.problems: dict[str, str] = {}  # pin or adapter name -> why it is not served as stored
        self.pin_specs: dict[str, str] = {}  # pin name -> its canonical spec as applied
        self.tune_results: dict[str, dict] = {}  # finished tune jobs the store holds, by id
        # The store version of the last write this server made or applied, per pin and per adapter name:
        # an older snapshot (read before a local write) or a slower local write never undoes a newer one.
        self.pin_versions: dict[str, int] = {}
        self.adapter_versions: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._apply_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------ start, stop
    async def restore(self) -> None:
        """Apply the store's state (start-up, before ready), then follow it."""
        if self.store is None:
            return
        snapshot = await self._read()
        if snapshot is not None:
            await self.apply(snapshot)
            log.info("state store %s (version %d): %d adapter registrations, %d pins restored%s",
                     redact(self.store.url), snapshot.version, len(snapshot.adapters), len(snapshot.pins),
                     f"; not restored: {self.problems}" if self.problems else "")  # fmt: skip
        self._task = asyncio.create_task(self._follow(), name="mixserve-state-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.store is not None:
            self.store.close()

    # --------------------------------------------------------------------------------------- writes
    async def write(self, method: str, *args) -> int:
        """``store.<method>(*args)`` off the loop: the version it made (0 without a store); raises
        :class:`StoreUnavailableError` (a 503) if the store cannot take it, and then nothing was changed."""
        if self.store is None:
            return 0
        return await asyncio.to_thread(self.write_now, method, *args)

    def write_now(self, method: str, *args) -> int:
        """:meth:`write` on the calling thread (a worker thread already)."""
        if self.store is None:
            return 0
        try:
            version = getattr(self.store, method)(*args)
        except StoreUnavailableError:
            self._mark(False)
            raise
        self._mark(True)
        return version

    def newest(self, versions: dict[str, int], name: str, version: int) -> bool:
        """Record that ``name`` was written at ``version``; False if a later write of it is known already."""
        if self.store is not None and version < versions.get(name, 0):
            return False
        versions[name] = version
        return True

    # ------------------------------------------------------------------------------------ following
    async def _read(self) -> Snapshot | None:
        return await self._ask(self.store.snapshot)

    async def _ask(self, read):
        """``read()`` off the loop; None (logged once, marked unreachable) while the store is down."""
        try:
            value = await asyncio.to_thread(read)
        except StoreUnavailableError as exc:
            if self.reachable:
                log.warning("%s; serving what is in memory, retrying", exc)
            self._mark(False)
            return None
        self._mark(True)
        return value

    def _mark(self, reachable: bool) -> None:
        if reachable and not self.reachable:
            log.info("state store %s reachable again", redact(self.store.url))
        self.reachable = reachable
        if reachable:
            self.last_contact = time.time()
        metrics = self._state.metrics
        metrics.store_up.set(1 if reachable else 0)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                version = await self._ask(self.store.version)
            except Exception:  # a bug here must not stop the follower
                log.exception("state store poll failed")
                continue
            if version is None:
                continue
            self._state.metrics.store_version.set(version)
            if version != self.version:
                snapshot = await self._read()
                if snapshot is not None:
                    try:
                        await self.apply(snapshot)
                    except Exception:
                        log.exception("applying state store version %d failed", snapshot.version)

    # ------------------------------------------------------------------------------------- applying
    async def apply(self, snapshot: Snapshot) -> None:
        """Make memory match ``snapshot``: registrations, then pins (added, changed, removed)."""
        async with self._apply_lock:
            state = self._state
            for record in snapshot.adapters.values():
                if record.version <= self.adapter_versions.get(record.name, 0):
                    continue  # this server wrote or applied it (or something newer) already
                try:
                    adapter: LoraAdapter = await asyncio.to_thread(state.registry.load, record.name, record.path)
                except AdapterError as exc:
                    self.problems[record.name] = f"adapter not restored: {exc}"
                    log.warning("adapter %s not restored: %s", record.name, exc)
                    continue
                if adapter.fingerprint != record.fingerprint:
                    self.problems[record.name] = (f"adapter {record.name} changed on disk since it was registered "
                                                  f"(fingerprint {record.fingerprint[:12]} -> {adapter.fingerprint[:12]})")  # fmt: skip
                    log.warning("%s", self.problems[record.name])
                if self.newest(self.adapter_versions, record.name, record.version):
                    state.registry.add(adapter)
            state.update_adapter_metrics()
            for name, record in snapshot.pins.items():
                if record.version <= self.pin_versions.get(name, 0):
                    continue
                try:
                    entry = await state.pin(name, record.spec, persist=False, version=record.version)
                except Exception as exc:  # a pin that cannot come back is reported, never blocks the others
                    reason = getattr(exc, "message", None) or str(exc)
                    self.problems[name] = f"pin not restored: {reason}"
                    log.warning("pin %s not restored: %s", name, reason)
                    self.pin_versions[name] = record.version  # reported once, not retried every poll
                    continue
                self.problems.pop(name, None)
                if record.key is not None and entry.key != record.key:
                    self.problems[name] = ("pin restored, but an adapter it merges changed since it was pinned "
                                           "(another content fingerprint): served with the adapters as they are now")  # fmt: skip
                    log.warning("pin %s: %s", name, self.problems[name])
            for name in [n for n in self.pin_specs if n not in snapshot.pins]:
                # Only pins the store gave or took (version > 0); the pin file's stay.
                if 0 < self.pin_versions.get(name, 0) < snapshot.version and name in state.pins:
                    await state.unpin(name, persist=False, version=snapshot.version)  # unpinned elsewhere
            self.tune_results = snapshot.tune_results
            self.version = max(self.version, snapshot.version)
            state.metrics.store_version.set(snapshot.version)

    def view(self) -> dict:
        """For ``/ready`` and ``/admin/cache``."""
        if self.store is None:
            return {"kind": "none", "persistent": False}
        return {"kind": self.store.kind, "url": redact(self.store.url), "reachable": self.reachable,
                "version": self.version, "seconds_since_contact": round(time.time() - self.last_contact, 3)}  # fmt: skip
