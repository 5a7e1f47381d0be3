"""The member pool over HTTP: member-core and factor-path mixes in one server, cache and pool accounting,
adapters registered while requests run, and more adapters than the pool holds."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
from pathlib import Path

import httpx
import pytest

from merging.adapters import load_adapter
from merging.synthetic import write_random_adapter
from server.config import ServeConfig
from tests.server_harness import running_server
from tests.test_server_http import ADMIN, JSON, PY, SQL, TOKEN, generate, metrics

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
NAMES = ("sql", "python", "pystr", "json")
CORE_BYTES = 4 * 7 * 64 * 64 * 4  # 4 layers x 7 projections x a 64 x 64 fp32 core (4 rank-16 members)
CORE3_BYTES = 4 * 7 * 48 * 48 * 4  # three members
TIES = {"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in NAMES]}
DENSE = {"method": "ties", "space": "dense", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}


@pytest.fixture
def root(tmp_path) -> Path:
    """An adapter root holding copies of the demo's four adapters."""
    for name in NAMES:
        shutil.copytree(DEMO / "adapters" / name, tmp_path / "root" / name)
    return tmp_path / "root"


def _extra(path: Path, seed: int = 11) -> Path:
    shapes = {m: f.shape for m, f in load_adapter(DEMO / "adapters" / "sql", "sql").modules.items()}
    return write_random_adapter(path, shapes, rank=16, alpha=32.0, seed=seed)


def _warm(url: str, mix, client=httpx) -> dict:
    r = client.post(url + "/admin/mixes", json={"name": "w", "mix": mix, "pin": False}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_member_and_factor_mixes_are_accounted_for(root):
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None)
    with running_server(config) as (url, _):
        core, dense = _warm(url, TIES), _warm(url, DENSE)
        assert core["path"] == "members" and core["fallback"] is None and core["bytes"] == CORE_BYTES
        assert dense["path"] == "factors" and dense["fallback"] == "a dense-space node"
        assert dense["bytes"] > 4 * CORE_BYTES  # rank-32 factors of every projection
        pair = _warm(url, {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json"}]})
        assert pair["bytes"] == 4 * 7 * 32 * 32 * 4  # a mix costs its own members' rank, not the registry's
        cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
        pool = cache["adapter_pool"]
        assert pool["registered"] == 4 and pool["resident"] == 0 and pool["adapter_slots"] == 32
        assert pool["mix_slots"] == 16  # 2 x --max-batch
        by_path = {}
        for e in cache["entries"]:
            by_path[e["path"]] = by_path.get(e["path"], 0) + e["bytes"]
        assert by_path == {"members": CORE_BYTES + pair["bytes"], "factors": dense["bytes"]}
        m = metrics(url)
        assert m["mixserve_mix_cache_path_bytes{path=members}"] == CORE_BYTES + pair["bytes"]
        assert m["mixserve_mix_cache_path_entries{path=factors}"] == 1
        assert m["mixserve_mix_merges_total{path=members}"] == 2 and m["mixserve_adapters_registered"] == 4
        # Both kinds, and the base, in one running batch: every request is answered as when alone.
        jobs = [(SQL, TIES), (JSON, DENSE), (PY, None), (SQL, "sql"), (JSON, TIES), (SQL, DENSE)]
        alone = [generate(url, p, mix, 12)["text"] for p, mix in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: generate(url, job[0], job[1], 12)["text"], jobs))
        assert together == alone
        listed = httpx.get(url + "/admin/adapters", headers=ADMIN).json()
        assert [a["resident"] for a in listed["adapters"]] == [True] * 4 and listed["adapter_pool"]["resident"] == 4
        m = metrics(url)
        assert m["mixserve_adapter_pool_resident"] == 4 and m["mixserve_adapter_pool_loads_total"] == 4
        assert m["mixserve_adapter_pool_evictions_total"] == 0 and m["mixserve_adapter_pool_in_use"] == 0


def test_thousands_of_member_mixes_fit_the_default_cache(root):
    """1,000 distinct ad-hoc mixes (weights differ) stay resident under the default 512 MiB budget."""
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=4, pin_file=None)
    with running_server(config) as (url, _), httpx.Client() as client:
        for i in range(1000):
            mix = {"method": "ties", "density": 0.5, "children": [
                {"adapter": "sql", "weight": 1 + i / 1000}, {"adapter": "json"}, {"adapter": "python", "weight": 0.5}]}  # fmt: skip
            _warm(url, mix, client)
        cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
        assert len(cache["entries"]) == 1000 and cache["bytes"] == 1000 * CORE3_BYTES <= 512 << 20
        assert metrics(url)["mixserve_mix_cache_evictions_total"] == 0
        assert cache["merge_caches"]["adapter_sets"] == 1  # one adapter set: its bases computed once


def test_adapters_registered_while_requests_run(root):
    """Streams on member mixes keep going (and generate what they generate without the registrations) while
    adapters are registered; mixes with them are served from member cores too, whatever their number."""
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None)
    dare = {"method": "dare_ties", "drop_rate": 0.3, "children": [{"adapter": n} for n in NAMES]}
    jobs = [(SQL, TIES), (JSON, TIES), (PY, "python"), (SQL, dare)]
    _extra(root.parent / "staged")  # written before the server starts, moved in while requests run
    with running_server(config) as (url, _):

        def run(job):
            body = {"prompt": job[0], "mix": job[1], "max_tokens": 200, "ignore_eos": True}
            return httpx.post(url + "/generate", json=body, timeout=120).json()["text"]

        expected = [run(job) for job in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            running = [pool.submit(run, job) for job in jobs]
            while httpx.get(url + "/metrics").text.count("mixserve_requests_running 4.0") == 0:
                pass  # every stream admitted
            (root.parent / "staged").rename(root / "extra")
            r = httpx.post(url + "/admin/adapters", json={"name": "extra", "path": "extra"}, headers=ADMIN, timeout=60)
            assert r.status_code == 200, r.text
            own = load_adapter(root / "extra", "extra")  # every module at rank 16: no padding in the pool
            assert r.json()["device_bytes"] == sum((f.A.numel() + f.B.numel()) * 4 for f in own.modules.values())
            assert not all(f.done() for f in running)  # the registration happened while they ran
            with_extra = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "extra"}]}
            assert _warm(url, with_extra)["path"] == "members"
            extra_text = generate(url, SQL, with_extra, 16)["text"]
            assert [f.result() for f in running] == expected
        assert generate(url, SQL, with_extra, 16)["text"] == extra_text
        for i in range(12):  # more adapters than any bound the old shared basis had (16 x rank 16)
            _extra(root / f"more{i}", seed=20 + i)
            r = httpx.post(url + "/admin/adapters", json={"name": f"more{i}", "path": f"more{i}"}, headers=ADMIN,
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
        late = {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "more11"}, {"adapter": "extra"}]}
        assert _warm(url, late)["path"] == "members"
        with cf.ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda mix: generate(url, SQL, mix, 12)["text"], [late, TIES, with_extra]))
        assert texts == [generate(url, SQL, mix, 12)["text"] for mix in (late, TIES, with_extra)]


def test_more_adapters_than_the_pool_holds(root):
    """A pool of 4 adapter slots and mixes over 8 adapters, concurrently: every request completes with what
    it generates alone, nothing is over the budget, and evictions are counted."""
    for i in range(4):
        _extra(root / f"r{i}", seed=40 + i)
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None,
                         adapter_slots=4)  # fmt: skip
    config.limits.max_mix_adapters = 4
    names = [*NAMES, "r0", "r1", "r2", "r3"]
    mixes = [{"method": "ties", "density": 0.5, "children": [{"adapter": names[(i + k * 3) % 8]} for k in range(2)]}
             for i in range(8)]  # fmt: skip
    with running_server(config) as (url, _):
        alone = [generate(url, SQL, mix, 10)["text"] for mix in mixes]
        with cf.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda mix: generate(url, SQL, mix, 10)["text"], mixes * 2))
        assert together == alone * 2
        m = metrics(url)
        assert m["mixserve_adapter_pool_resident"] <= 4 and m["mixserve_adapter_pool_slots"] == 4
        assert m["mixserve_adapter_pool_evictions_total"] >= 4
        assert m["mixserve_adapter_pool_loads_total"] == m["mixserve_adapter_pool_evictions_total"] + 4


@pytest.mark.slow
def test_a_thousand_adapters_registered_serve_mixes_over_any_of_them(tmp_path):
    """1,000 adapters in the root (the demo's four and 996 random rank-2 ones): the server starts, and mixes
    over adapters anywhere in the list are merged on their own members and served, the pool within budget."""
    import time

    root = tmp_path / "root"
    for name in NAMES:
        shutil.copytree(DEMO / "adapters" / name, root / name)
    shapes = {m: f.shape for m, f in load_adapter(DEMO / "adapters" / "sql", "sql").modules.items()}
    for i in range(996):
        write_random_adapter(root / f"r{i:03d}", shapes, rank=2, alpha=4.0, seed=1000 + i)
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None)
    t0 = time.perf_counter()
    with running_server(config) as (url, _):
        started = time.perf_counter() - t0
        listed = httpx.get(url + "/admin/adapters", headers=ADMIN).json()
        assert len(listed["adapters"]) == 1000 and listed["adapter_pool"]["resident"] == 0
        mixes = [{"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in names]}
                 for names in (("sql", "r000", "r995"), ("r500", "json"), ("r123", "r456", "r789", "python"))]  # fmt: skip
        with cf.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda mix: generate(url, SQL, mix, 8), mixes))
        for mix, body in zip(mixes, together, strict=True):
            assert body["completion_tokens"] == 8
            warm = _warm(url, mix)  # one rank-16 demo adapter and rank-2 ones: a core of their ranks' sum
            assert warm["path"] == "members" and warm["bytes"] == 4 * 7 * (16 + 2 * (len(mix["children"]) - 1)) ** 2 * 4
        pool = httpx.get(url + "/admin/adapters", headers=ADMIN).json()["adapter_pool"]
        assert pool["resident"] == 9 <= pool["adapter_slots"] and pool["evictions"] == 0
        print(f"start-up with 1,000 adapters: {started:.1f} s")  # timed in bench.many_adapters, not asserted
