"""Every Grafana panel's PromQL returns data from a real Prometheus scraping a loaded mixserve.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``); skipped without it.
Everything listens on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
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
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="the prometheus binary is not installed"),
    pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained"),
]


def _load(url: str, stop: threading.Event) -> None:
    """Mixed traffic: adapters, a pinned mix, and ad-hoc mixes (merges, cache misses, evictions)."""
    import concurrent.futures as cf

    named = ["sql", "json", "code", None]

    def one(i: int) -> None:
        # Every other request an ad-hoc mix never seen before (a new DARE seed): merges and cache misses go
        # on for the whole run, and evictions once the 5 MiB budget holds a dozen core-space mixes.
        mix = (
            named[(i // 2) % len(named)]
            if i % 2
            else {
                "method": "dare_ties",
                "drop_rate": 0.3,
                "seed": i,
                "children": [{"adapter": "sql"}, {"adapter": "json"}],
            }
        )
        body = {"prompt": "### task: sql\n### input: count the books per author\n### output:\n",
                "mix": mix, "max_tokens": 12}  # fmt: skip
        httpx.post(url + "/generate", json=body, timeout=60)

    i = 0
    with cf.ThreadPoolExecutor(4) as pool:
        while not stop.is_set():
            list(pool.map(one, range(i, i + 4)))
            i += 4


def test_every_dashboard_query_returns_data(tmp_path):
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token="t", max_batch=8,
                         cache_bytes=5 << 20)  # fmt: skip
    with running_server(config) as (url, _app):
        pin = {"method": "ties", "density": 0.5, "children": [{"adapter": "python"}, {"adapter": "pystr"}]}
        httpx.post(url + "/admin/mixes", json={"name": "code", "mix": pin}, headers={"Authorization": "Bearer t"},
                   timeout=60).raise_for_status()  # fmt: skip
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: mixserve, static_configs: [{{targets: ['{url.split('//')[1]}']}}]}}]\n"
        )
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(url, stop), daemon=True)
        loader.start()
        try:
            time.sleep(20)  # load while Prometheus scrapes every second
            dashboard = json.loads((ROOT / "deploy" / "grafana" / "mixserve.json").read_text())
            empty = []
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": target["expr"]})
                    assert r.status_code == 200 and r.json()["status"] == "success", (target["expr"], r.text)
                    values = [float(s["value"][1]) for s in r.json()["data"]["result"]]
                    if not any(math.isfinite(v) for v in values):
                        empty.append(f"{panel['title']}: {target['expr']}")
            assert not empty, "queries without data:\n" + "\n".join(empty)
        finally:
            stop.set()
            loader.join(60)
            prom.terminate()
            prom.wait(30)
