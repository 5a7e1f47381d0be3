"""Ray Serve scale-out for mixserve, with mix affinity.

Each ``MixserveReplica`` runs a whole mixserve server (base model resident, its own mix cache and
engine) on a local port. The ``Router`` ingress speaks the same HTTP API: for a generation request
it computes the request's mix key (the pinned / adapter name, or the canonical hash of an ad-hoc
mix) and asks Ray for a replica with ``multiplexed_model_id=key``. Ray's multiplexed routing sends
a key to a replica that already "loaded" it (ran ``_affinity`` for it), so the replica that merged
and cached a mix keeps getting its requests; the router then streams the request to that replica
over HTTP. With ``affinity=False`` the key is not passed and Ray balances requests without regard
to mixes (the comparison the tests measure).

    serve run deploy.ray.app:build_app replicas=2            # or: python -m deploy.ray.app --replicas 2

Admin calls that change what a server holds (register an adapter, pin or unpin a mix):
- with a shared state store (``state=postgresql+psycopg://...``, or a SQLite file when every replica
  runs on one host), they go to one replica like any call: it writes the store before answering, and
  every other replica, including one Serve starts later or restarts, follows the store (README,
  "Operations": within 2 s);
- without one, they go to every replica: each replica enters its URL in its application's
  ``ReplicaDirectory`` actor and the router sends the call to all of them at once, answering with the
  first failing (else the first) replica's body, the worst status, and ``replicas`` (how many took it,
  and which failed). A replica that starts later does not get earlier broadcasts.
Other admin calls (cache, tune jobs) go to one replica.
"""

import asyncio
import hashlib
import json
import threading
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

GENERATION_PATHS = ("v1/completions", "v1/chat/completions", "generate")
DIRECTORY = "mixserve-replica-directory"  # + the Serve application's name: one directory per app
BROADCAST_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a pin merges the mix: seconds to minutes on a 7B
router_app = FastAPI(title="mixserve (Ray Serve)")


def broadcast(method: str, path: str) -> bool:
    """Admin calls every replica must take: adapter registration, pin (POST admin/adapters, admin/mixes)
    and unpin (DELETE admin/mixes/<name>; not DELETE admin/mixes/tune/<job id>)."""
    if method == "POST":
        return path in ("admin/adapters", "admin/mixes")
    name = path.removeprefix("admin/mixes/")
    return method == "DELETE" and name != path and name != "" and "/" not in name


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """The URLs of the live mixserve replicas (for admin calls that must reach every one)."""

    def __init__(self) -> None:
        self.urls: set[str] = set()

    def add(self, url: str) -> None:
        self.urls.add(url)

    def remove(self, url: str) -> None:
        self.urls.discard(url)

    def all(self) -> list[str]:
        return sorted(self.urls)


def directory(app_name: str):
    """The replica directory of one Serve application (two mixserve apps on a cluster stay apart).
    Detached so that it outlives the replica that happened to create it; stale URLs are dropped by
    the router when they stop answering."""
    return ReplicaDirectory.options(name=f"{DIRECTORY}-{app_name}", get_if_exists=True, lifetime="detached").remote()


def forwarded_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}


def mix_key(body: bytes) -> str:
    """The affinity key of a generation request body ('' for the base model or an unreadable body)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return ""
    mix = data.get("mix") if isinstance(data, dict) else None
    if isinstance(mix, dict):
        from merging.spec import mix_hash, parse_mix

        try:
            return mix_hash(parse_mix(mix))
        except Exception:  # invalid specs go anywhere: the replica answers the 400
            return hashlib.sha256(json.dumps(mix, sort_keys=True).encode()).hexdigest()
    if isinstance(mix, str):
        return mix
    return data.get("model", "") if isinstance(data, dict) else ""


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class MixserveReplica:
    """A full mixserve server on 127.0.0.1 inside this replica's process."""

    def __init__(self, serve_kwargs: dict[str, Any] | None = None) -> None:
        import uvicorn

        from mixserve.tune_jobs import TuneService
        from server.config import ServeConfig
        from server.entrypoints.api import create_app
        from server.readiness import free_port, wait_until_ready

        config = ServeConfig(**(serve_kwargs or {}))
        config.host, config.port = "127.0.0.1", free_port()
        self.url = f"http://127.0.0.1:{config.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(config, [TuneService()]), host=config.host, port=config.port,
                                                     log_level="warning"))  # fmt: skip
        threading.Thread(target=self._server.run, daemon=True).start()
        wait_until_ready(self.url)
        self._directory = directory(serve.get_replica_context().app_name)
        ray.get(self._directory.add.remote(self.url))

    def __del__(self) -> None:  # Serve calls it when it shuts a replica down
        try:
            self._directory.remove.remote(self.url)
            self._server.should_exit = True
        except Exception:  # best effort: the router drops URLs that stop answering
            pass

    @serve.multiplexed(max_num_models_per_replica=256)
    async def _affinity(self, key: str) -> str:
        # Nothing to load here: the replica's own mix cache merges on first use. Registering the key
        # is what makes Ray route the key's later requests to this replica.
        return key

    async def url_for(self) -> str:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._affinity(key)
        return self.url

    async def stats(self) -> dict:
        """This replica's URL and its mix-cache counters (from its /metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        async with httpx.AsyncClient() as client:
            text = (await client.get(self.url + "/metrics")).text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        return {
            "url": self.url,
            "hits": values.get("mixserve_mix_cache_hits_total", 0.0),
            "misses": values.get("mixserve_mix_cache_misses_total", 0.0),
        }


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(router_app)
class Router:
    def __init__(self, replica: DeploymentHandle, affinity: bool = True, shared_state: bool = False) -> None:
        """``shared_state``: the replicas share a state store, so admin writes need not be broadcast."""
        self.replica, self.affinity, self.shared_state = replica, affinity, shared_state
        self.client = httpx.AsyncClient(timeout=None)
        self.directory = directory(serve.get_replica_context().app_name)

    async def _broadcast(self, path: str, request: Request, body: bytes) -> JSONResponse:
        urls = await self.directory.all.remote()
        headers = forwarded_headers(request)

        async def call(url: str) -> httpx.Response | None:
            try:
                return await self.client.request(request.method, f"{url}/{path}", content=body, headers=headers,
                                                 params=request.query_params, timeout=BROADCAST_TIMEOUT)  # fmt: skip
            except httpx.TransportError:  # a replica that is gone (or hung): forget it
                self.directory.remove.remote(url)
                return None

        # All replicas at once: a pin merges on each, and one hung replica must not hold up the others.
        replies = [
            (u, r) for u, r in zip(urls, await asyncio.gather(*(call(u) for u in urls)), strict=True) if r is not None
        ]
        answers = [r for _, r in replies]
        failed = [{"replica": u, "status": r.status_code} for u, r in replies if r.status_code >= 400]
        if not answers:
            return JSONResponse({"error": {"message": "no mixserve replica is reachable", "type": "server_error",
                                           "param": None, "code": "no_replica"}}, status_code=503)  # fmt: skip
        first = next((r for r in answers if r.status_code >= 400), answers[0])
        payload = first.json() if first.headers.get("content-type", "").startswith("application/json") else {}
        payload["replicas"] = {"total": len(answers), "ok": len(answers) - len(failed), "failed": failed}
        return JSONResponse(payload, status_code=max(r.status_code for r in answers))

    @router_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def proxy(self, path: str, request: Request):
        body = await request.body()
        if not self.shared_state and broadcast(request.method, path):
            return await self._broadcast(path, request, body)
        key = mix_key(body) if self.affinity and path in GENERATION_PATHS else ""
        handle = self.replica.options(multiplexed_model_id=key) if key else self.replica
        url = await handle.url_for.remote()
        upstream = self.client.build_request(request.method, f"{url}/{path}", content=body, headers=forwarded_headers(request),
                                             params=request.query_params)  # fmt: skip
        response = await self.client.send(upstream, stream=True)
        kind = response.headers.get("content-type", "")
        if kind.startswith("text/event-stream"):

            async def relay():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return StreamingResponse(relay(), status_code=response.status_code, media_type=kind)
        content = await response.aread()
        await response.aclose()
        if kind.startswith("application/json"):
            return JSONResponse(json.loads(content), status_code=response.status_code)
        return Response(content, status_code=response.status_code, media_type=kind or None)


def build_app(args: dict[str, str]) -> Any:
    """``serve run deploy.ray.app:build_app replicas=2 affinity=true model=DIR adapters=DIR state=URL``."""
    kwargs = {k: args[k] for k in ("model", "adapters", "state") if k in args}
    replica = MixserveReplica.options(num_replicas=int(args.get("replicas", 2))).bind(kwargs)
    return Router.bind(replica, str(args.get("affinity", "true")).lower() == "true", "state" in kwargs)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run mixserve on Ray Serve with mix affinity.")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--no-affinity", dest="affinity", action="store_false")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--state", help="the replicas' shared state store (a database URL)")
    a = ap.parse_args()
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    app_args = {"replicas": str(a.replicas), "affinity": str(a.affinity)} | ({"state": a.state} if a.state else {})
    serve.run(build_app(app_args), blocking=True)
