"""Ray Serve scale-out: 2 replicas on CPU give the single server's outputs, and with mix affinity each
mix is merged on one replica only (measured against the same traffic without affinity)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from server.config import ServeConfig
from tests.server_harness import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mixserve" / "demo"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained"),
]
ray = pytest.importorskip("ray", reason="ray[serve] is not installed")
PROMPT = "### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; how many books have author bemi\n### output:\n"
MIXES = [{"method": "dare_ties", "drop_rate": 0.3, "seed": s, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
         for s in range(6)]  # fmt: skip
ROUNDS = 4


def _traffic(url: str) -> list[str]:
    texts = []
    for r in range(ROUNDS):
        for mix in MIXES:
            body = {"prompt": PROMPT, "mix": mix, "max_tokens": 8}
            resp = httpx.post(url + "/generate", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            texts.append(resp.json()["text"])
        if r == 0:
            time.sleep(2)  # let the replicas' loaded-mix reports reach the router
    return texts


def _cache_totals(replica_handle) -> tuple[float, float]:
    stats = {}
    for _ in range(40):  # calls are balanced over replicas: collect until both answered
        s = replica_handle.stats.remote().result()
        stats[s["url"]] = s
        if len(stats) == 2:
            break
    assert len(stats) == 2
    return sum(s["hits"] for s in stats.values()), sum(s["misses"] for s in stats.values())


TOKEN = "ray-admin"


def _pin_reaches_every_replica(url: str) -> None:
    from deploy.ray.app import directory

    admin = {"Authorization": f"Bearer {TOKEN}"}
    pin = {"name": "everywhere", "mix": {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"},
                                                                                       {"adapter": "json"}]}}  # fmt: skip
    r = httpx.post(url + "/admin/mixes", json=pin, headers=admin, timeout=120)
    assert r.status_code == 200 and r.json()["replicas"] == {"total": 2, "ok": 2, "failed": []}, r.text
    replicas = ray.get(directory("mixserve").all.remote())
    live = [u for u in replicas if httpx.get(u + "/health", timeout=5).status_code == 200]
    assert len(live) == 2
    for u in live:  # every replica has the pin, not just one
        assert "everywhere" in {m["id"] for m in httpx.get(u + "/v1/models").json()["data"]}
    r = httpx.delete(url + "/admin/mixes/everywhere", headers=admin, timeout=60)
    assert r.status_code == 200 and r.json()["replicas"]["ok"] == 2
    for u in live:
        assert "everywhere" not in {m["id"] for m in httpx.get(u + "/v1/models").json()["data"]}
    assert httpx.post(url + "/admin/mixes", json=pin).status_code == 401  # the token is still needed


def test_two_replicas_same_outputs_and_affinity_keeps_each_mix_on_one_replica():
    from ray import serve

    from deploy.ray.app import MixserveReplica, Router

    with running_server(ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", max_batch=4)) as (url, _):
        reference = _traffic(url)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results = {}
        for affinity in (True, False):
            replica = MixserveReplica.options(num_replicas=2).bind({"max_batch": 4, "admin_token": TOKEN})
            serve.run(Router.bind(replica, affinity), name="mixserve", route_prefix="/")
            texts = _traffic(f"http://127.0.0.1:{port}")
            assert texts == reference  # same greedy outputs as the single server
            handle = serve.get_deployment_handle("MixserveReplica", app_name="mixserve")
            results[affinity] = _cache_totals(handle)
            if affinity:
                _pin_reaches_every_replica(f"http://127.0.0.1:{port}")
            serve.delete("mixserve")
        hits, misses = results[True]
        assert misses == len(MIXES), f"with affinity every mix is merged once in all: {results}"
        assert hits == len(MIXES) * (ROUNDS - 1)
        no_hits, no_misses = results[False]
        assert no_misses > len(MIXES), f"without affinity mixes get merged on both replicas: {results}"
        print(f"cache hit ratio: affinity {hits / (hits + misses):.2f}, none {no_hits / (no_hits + no_misses):.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize(
    "method,path,every",
    [("POST", "admin/mixes", True), ("POST", "admin/adapters", True), ("DELETE", "admin/mixes/tuned", True),
     ("DELETE", "admin/mixes/tune", True), ("DELETE", "admin/mixes/tune-sql", True),
     ("POST", "admin/mixes/tune", False), ("DELETE", "admin/mixes/tune/ab12", False), ("GET", "admin/mixes", False),
     ("GET", "admin/cache", False), ("DELETE", "admin/mixes/", False), ("POST", "generate", False)],
)  # fmt: skip
def test_which_admin_calls_reach_every_replica(method, path, every):
    from deploy.ray.app import broadcast

    assert broadcast(method, path) is every  # pins named like "tuned" are unpinned everywhere, tune jobs are not


def test_replicas_on_one_state_store_share_pins_and_a_restarted_replica_has_them(tmp_path):
    """Admin writes go to one replica (no broadcast); the store carries them to the other, and to the
    replica Serve starts in place of one that was killed."""
    from ray import serve

    from deploy.ray.app import MixserveReplica, Router, directory

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        kwargs = {"max_batch": 4, "admin_token": TOKEN, "state": str(tmp_path / "state.db")}
        serve.run(Router.bind(MixserveReplica.options(num_replicas=2).bind(kwargs), True, True), name="mixserve",
                  route_prefix="/")  # fmt: skip
        url, admin = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
        pin = {"name": "stored", "mix": {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"},
                                                                                       {"adapter": "json"}]}}  # fmt: skip
        r = httpx.post(url + "/admin/mixes", json=pin, headers=admin, timeout=120)
        assert r.status_code == 200 and "replicas" not in r.json(), r.text  # one replica took it

        def pinned(u: str) -> bool:
            try:
                return "stored" in httpx.get(u + "/ready", timeout=5).json()["pins"]
            except (httpx.TransportError, ValueError, KeyError):
                return False

        urls = ray.get(directory("mixserve").all.remote())
        deadline = time.monotonic() + 2.0
        while not all(pinned(u) for u in urls):
            assert time.monotonic() < deadline, "the pin did not reach every replica within 2 s"
            time.sleep(0.05)
        # Kill one replica's actor: Serve replaces it, and the new one restores the pin from the store.
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "MixserveReplica" in a["name"]]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 180
        while True:
            fresh = [u for u in ray.get(directory("mixserve").all.remote()) if u not in urls and pinned(u)]
            if fresh:
                break
            assert time.monotonic() < deadline, "Serve's replacement replica did not come up with the pin"
            time.sleep(1)
        serve.delete("mixserve")
    finally:
        serve.shutdown()
        ray.shutdown()
