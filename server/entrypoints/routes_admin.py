"""Admin endpoints behind a bearer token: register adapters, pin / unpin mixes, inspect the cache.

The token comes from ``MIXSERVE_ADMIN_TOKEN`` and is compared in constant time (``auth.py``). With no token set
the admin API is refused, unless the server runs with ``--insecure-admin`` (local experiments).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from merging.adapters import AdapterError
from server.entrypoints.auth import bearer, secrets_match
from server.entrypoints.mergekit_mixes import mix_from_mergekit
from server.entrypoints.routes_openai import StateDep
from server.entrypoints.schemas import PinMixRequest, RegisterAdapterRequest
from server.entrypoints.state import RequestError, ServerState


def require_admin(request: Request, state: StateDep) -> ServerState:
    token = state.config.admin_token
    if token is None:
        if state.config.insecure_admin:
            return state
        raise RequestError(403, "the admin API is disabled: set MIXSERVE_ADMIN_TOKEN (or run with --insecure-admin)",
                           None, "admin_disabled")  # fmt: skip
    given = bearer(request)
    if given is None:
        raise RequestError(401, "admin endpoints need 'Authorization: Bearer <token>'", None, "unauthorized")
    if not secrets_match(given, token):
        raise RequestError(403, "wrong admin token", None, "forbidden")
    return state


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.post("/adapters")
async def register_adapter(body: RegisterAdapterRequest, state: StateDep):
    try:
        # Reading and hashing the weights are file I/O: off the loop.
        adapter = await asyncio.to_thread(state.register_adapter, body.name, body.path, replace=body.replace)
    except AdapterError as exc:
        conflict = "already registered" in str(exc)
        raise RequestError(
            409 if conflict else 400, str(exc), "path", "conflict" if conflict else "bad_adapter"
        ) from None
    state.update_adapter_metrics()
    return {
        "name": adapter.name,
        "modules": len(adapter.modules),
        "ranks": sorted(set(adapter.ranks.values())),
        "fingerprint": adapter.fingerprint,
        "device_bytes": state.runtime.cores.adapter_bytes(adapter),
    }


@router.post("/mixes")
async def pin_mix(body: PinMixRequest, state: StateDep):
    raw, notes = body.mix, []
    if body.mergekit is not None:
        # Off the loop: a config may name adapter directories to register (file I/O).
        translated = await asyncio.to_thread(mix_from_mergekit, state, body.mergekit, body.space)
        state.update_adapter_metrics()
        raw, notes = translated.mix.model_dump(exclude_none=True, by_alias=True), translated.notes
    if body.pin:
        entry = await state.pin(body.name, raw)
    else:  # warm the cache only
        resolved = state.resolve(None, raw)
        lease = await state.lease(resolved)
        if lease is None:
            raise RequestError(400, "the base model needs no merge", "mix")
        lease.release()
        entry = lease.entry
    mix = entry.mix
    return {"name": body.name, "key": entry.key, "pinned": body.pin, "method": mix.method, "space": mix.space,
            "path": mix.path, "fallback": mix.fallback, "merge_seconds": mix.seconds, "bytes": mix.nbytes,
            "max_rank": max(mix.ranks.values(), default=0),
            "min_energy_kept": min(mix.energy_kept.values(), default=1.0),
            **({"mix": raw, "notes": notes} if body.mergekit is not None else {})}  # fmt: skip


@router.delete("/mixes/{name}")
async def unpin_mix(name: str, state: StateDep):
    await state.unpin(name)
    return {"name": name, "pinned": False}


@router.get("/mixes")
async def pinned_mixes(state: StateDep):
    """The pinned mixes, the state store's version and what could not be restored from it (and why)."""
    pins = [{"name": p.name, "key": p.key, "mix": state.admin.pin_specs.get(p.name)} for p in state.pins.values()]
    for pin in pins:
        pin["mix"] = None if pin["mix"] is None else json.loads(pin["mix"])
    return {"pins": sorted(pins, key=lambda p: p["name"]), "not_restored": state.admin.problems,
            "store": state.admin.view()}  # fmt: skip


@router.get("/cache")
async def cache(state: StateDep):
    entries = [
        {
            "key": e.key,
            "pins": sorted(e.pins),
            "bytes": e.mix.nbytes,
            "leases": e.leases,
            "hits": e.hits,
            "method": e.mix.method,
            "space": e.mix.space,
            "path": e.mix.path,
            "fallback": e.mix.fallback,
            "merge_seconds": e.mix.seconds,
        }
        for e in state.cache.entries()
    ]
    return {"budget_bytes": state.cache.budget_bytes, "bytes": state.cache.nbytes, "entries": entries,
            "merges": state.cache.merges_started, "kv_cache_bytes": state.runtime.kv.nbytes,
            "kv_block_size": state.runtime.kv.block_size, "kv_blocks": state.runtime.kv.usable_blocks,
            "kv_blocks_free": state.runtime.kv.free_blocks, "mix_pool_slots": state.runtime.pool.max_loras,
            "mix_pool_bytes": state.runtime.pool.nbytes, "adapter_pool": adapter_pool(state),
            "state_store": state.admin.view(),
            "merge_caches": {"adapter_sets": len(state.families), "adapter_sets_bytes": state.families.nbytes,
                             "basis_sets": len(state.bases), "basis_bytes": state.bases.nbytes}}  # fmt: skip


@router.get("/adapters")
async def adapters(state: StateDep):
    """Every registered adapter, and whether it is resident on the device (in the member pool)."""
    pool = state.runtime.cores
    resident = {a.name: (slot, a.fingerprint) for slot, a in pool.adapters.loaded()}
    out = []
    for name in state.registry.names():
        a = state.registry[name]
        slot, fp = resident.get(name, (None, None))
        out.append({"name": name, "fingerprint": a.fingerprint, "ranks": sorted(set(a.ranks.values())),
                    "resident": fp == a.fingerprint, "slot": slot if fp == a.fingerprint else None})  # fmt: skip
    return {"adapters": out, "adapter_pool": adapter_pool(state)}


def adapter_pool(state) -> dict:
    """The member pool's budget and use: adapters resident on the device, loaded mix cores."""
    pool = state.runtime.cores
    return {"adapter_slots": pool.adapters.count, "resident": len(pool.adapters.loaded()),
            "in_use": pool.adapters.in_use(), "loads": pool.adapters.loads, "evictions": pool.adapters.evictions,
            "rank": pool.rank, "mix_slots": pool.mixes.count, "mix_core_rank": pool.core_rank,
            "bytes": pool.nbytes, "registered": len(state.registry.names())}  # fmt: skip
