"""The adapter family over HTTP: core-space and factor-path mixes in one server, cache accounting, and an
adapter registered while requests run."""

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
CORE_BYTES = 4 * 7 * 64 * 64 * 4  # 4 layers x 7 projections x a 64 x 64 fp32 core
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


def test_core_and_factor_mixes_are_accounted_for(root):
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None)
    with running_server(config) as (url, _):
        core, dense = _warm(url, TIES), _warm(url, DENSE)
        assert core["path"] == "core" and core["fallback"] is None and core["bytes"] == CORE_BYTES
        assert dense["path"] == "factors" and dense["fallback"] == "a dense-space node"
        assert dense["bytes"] > 4 * CORE_BYTES  # rank-32 factors of every projection
        cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
        assert cache["family"]["adapters"] == sorted(NAMES) and cache["family"]["rank"] == 64
        assert cache["core_pool_rank"] == 64 and cache["core_pool_slots"] == 16  # 2 x --max-batch
        by_path = {e["path"]: e["bytes"] for e in cache["entries"]}
        assert by_path == {"core": CORE_BYTES, "factors": dense["bytes"]} and cache["bytes"] == sum(by_path.values())
        m = metrics(url)
        assert m["mixserve_mix_cache_path_bytes{path=core}"] == CORE_BYTES
        assert m["mixserve_mix_cache_path_entries{path=factors}"] == 1
        assert m["mixserve_mix_merges_total{path=core}"] == 1 and m["mixserve_adapter_family_rank"] == 64
        # Both kinds, and the base, in one running batch: every request is answered as when alone.
        jobs = [(SQL, TIES), (JSON, DENSE), (PY, None), (SQL, "sql"), (JSON, TIES), (SQL, DENSE)]
        alone = [generate(url, p, mix, 12)["text"] for p, mix in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: generate(url, job[0], job[1], 12)["text"], jobs))
        assert together == alone


def test_thousands_of_core_mixes_fit_the_default_cache(root):
    """1,000 distinct ad-hoc mixes (weights differ) stay resident under the default 512 MiB budget."""
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=4, pin_file=None)
    with running_server(config) as (url, _), httpx.Client() as client:
        for i in range(1000):
            mix = {"method": "ties", "density": 0.5, "children": [
                {"adapter": "sql", "weight": 1 + i / 1000}, {"adapter": "json"}, {"adapter": "python", "weight": 0.5}]}  # fmt: skip
            _warm(url, mix, client)
        cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
        assert len(cache["entries"]) == 1000 and cache["bytes"] == 1000 * CORE_BYTES <= 512 << 20
        assert metrics(url)["mixserve_mix_cache_evictions_total"] == 0
        assert cache["family"]["basis_cache_sets"] == 1  # one adapter set: its bases computed once


def test_an_adapter_registered_while_requests_run(root):
    """Streams on core mixes keep going (and generate what they generate without the registration) while an
    adapter joins the family and grows the pool; mixes with it are then served from cores too, and an
    adapter past --family-rank takes the factor path beside them."""
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=8, pin_file=None,
                         family_rank=80)  # fmt: skip
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
            assert r.status_code == 200 and r.json()["family"] is True, r.text
            assert not all(f.done() for f in running)  # the registration happened while they ran
            with_extra = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "extra"}]}
            assert _warm(url, with_extra)["path"] == "core"
            extra_text = generate(url, SQL, with_extra, 16)["text"]
            assert [f.result() for f in running] == expected
        cache = httpx.get(url + "/admin/cache", headers=ADMIN).json()
        assert cache["family"]["rank"] == 80 and cache["core_pool_rank"] == 80
        assert generate(url, SQL, with_extra, 16)["text"] == extra_text
        # A sixth rank-16 adapter does not fit a rank-80 family: served from full factors, beside core mixes.
        _extra(root / "extra2", seed=12)
        r = httpx.post(url + "/admin/adapters", json={"name": "extra2", "path": "extra2"}, headers=ADMIN, timeout=60)
        assert r.status_code == 200 and r.json()["family"] is False and "bound is 80" in r.json()["family_note"]
        outside = {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "extra2"}]}
        warm = _warm(url, outside)
        assert warm["path"] == "factors" and "'extra2' is not in the adapter family" in warm["fallback"]
        with cf.ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda mix: generate(url, SQL, mix, 12)["text"], [outside, TIES, with_extra]))
        assert texts == [generate(url, SQL, mix, 12)["text"] for mix in (outside, TIES, with_extra)]


def test_an_adapter_whose_family_extension_fails_stays_registered_on_the_factor_path(root, monkeypatch):
    from merging.family import AdapterFamily

    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN, max_batch=4, pin_file=None)
    with running_server(config) as (url, _):

        def fails(self, adapter, **kw):
            raise RuntimeError("simulated out of memory")

        monkeypatch.setattr(AdapterFamily, "extend", fails)
        _extra(root / "extra", seed=13)
        r = httpx.post(url + "/admin/adapters", json={"name": "extra", "path": "extra"}, headers=ADMIN, timeout=60)
        assert r.status_code == 200 and r.json()["family"] is False, r.text
        assert "simulated out of memory" in r.json()["family_note"]
        mix = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "extra"}]}
        assert _warm(url, mix)["path"] == "factors"
        assert _warm(url, TIES)["path"] == "core"  # the family as it was keeps serving
        assert generate(url, SQL, mix, 8)["completion_tokens"] > 0
