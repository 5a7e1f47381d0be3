"""Mix tuning: the ask / tell search, ``mixserve tune`` end to end, and the server's admin tune jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from merging.spec import canonical_json, parse_mix
from mixserve.eval.tune import TUNABLE_METHODS, MixTuner, SearchSpace, check_tune_request, mean_retention
from server.config import ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
NAMES = ["sql", "python", "json"]


def fake_scores(mix: dict) -> dict[str, float]:
    """A deterministic stand-in for generation: rewards TIES near density 0.4 and scale near 1."""
    bonus = 0.3 if mix["method"] == "ties" else 0.0
    d = mix.get("density", 1.0)
    s = mix.get("weight", 1.0)
    base = 0.6 + bonus - abs(d - 0.4) * 0.2 - abs(s - 1.0) * 0.2
    return {n: base * (0.9 + 0.05 * i) for i, n in enumerate(NAMES)}


def _run(budget: int, seed: int = 0, methods=TUNABLE_METHODS) -> MixTuner:
    tuner = MixTuner(NAMES, {n: 1.0 for n in NAMES}, budget=budget, search=SearchSpace(methods=methods), seed=seed)
    while not tuner.done:
        number, mix = tuner.ask()
        tuner.tell(number, mix, fake_scores(mix), 0.0)
    return tuner


def test_every_proposed_mix_is_a_valid_mixspec():
    tuner = _run(60)
    seen = {t.mix["method"] for t in tuner.trials}
    assert len(seen) >= 5  # the sampler explores the methods
    for t in tuner.trials:
        spec = parse_mix(t.mix)  # validates every knob against the registry
        assert [leaf.adapter for leaf in spec.children] == NAMES
        assert t.mean == pytest.approx(mean_retention(fake_scores(t.mix), {n: 1.0 for n in NAMES})[0])


def test_search_starts_from_the_tables_rows_finds_the_optimum_and_is_reproducible():
    tuner = _run(40)
    first = [(t.mix["method"], t.mix.get("weight"), t.mix.get("density")) for t in tuner.trials[:4]]
    assert first == [("task_arithmetic", 0.5, None), ("task_arithmetic", 1.0, None), ("ties", 1.0, 0.2),
                     ("dare_ties", 1.0, None)]  # fmt: skip
    defaults = [t.mix for t in tuner.trials[:9]]
    assert {m["method"] for m in defaults} == set(TUNABLE_METHODS)
    for mix in defaults:  # every method's first trial is its registry defaults, as in the quality table
        spec = parse_mix(mix)
        assert canonical_json(spec) == canonical_json(parse_mix({k: v for k, v in mix.items() if k not in (
            "density", "drop_rate", "epsilon", "gamma", "sv_fraction", "common_fraction")} | (
            {"weight": mix["weight"]})))  # fmt: skip
    best = tuner.best()
    assert best.mix["method"] == "ties" and best.mean == max(t.mean for t in tuner.trials)
    assert best.mean > tuner.trials[2].mean  # better than the table's TIES row
    again = _run(40)
    assert [canonical_json(parse_mix(t.mix)) for t in again.trials] == [
        canonical_json(parse_mix(t.mix)) for t in tuner.trials
    ]


def test_the_space_can_be_searched_too():
    tuner = MixTuner(NAMES, {n: 1.0 for n in NAMES}, budget=30, search=SearchSpace(space="both"), seed=1)
    while not tuner.done:
        number, mix = tuner.ask()
        tuner.tell(number, mix, fake_scores(mix), 0.0)
    spaces = [t.mix["space"] for t in tuner.trials]
    assert spaces[:9] == ["dense"] * 9 and spaces[9:18] == ["lowrank"] * 9  # the defaults in both spaces first
    assert {parse_mix(t.mix).space for t in tuner.trials} == {"dense", "lowrank"}


def test_failed_trials_are_recorded_and_skipped():
    tuner = MixTuner(NAMES, {n: 1.0 for n in NAMES}, budget=3)
    for i in range(3):
        number, mix = tuner.ask()
        tuner.tell(number, mix, None if i == 1 else fake_scores(mix), 0.0, "merge failed" if i == 1 else None)
    assert tuner.trials[1].error == "merge failed" and tuner.trials[1].mean is None
    assert tuner.best() is not None and tuner.best().number != 1


@pytest.mark.parametrize(
    "tasks,budget,n_val,match",
    [(["sql", "nope"], 5, 5, "unknown task"), ([], 5, 5, "at least one task"), (["sql"], 0, 5, "budget"),
     (["sql"], 10**6, 5, "budget"), (["sql"], 5, 0, "n_val"), (["sql", "sql"], 5, 5, "twice")],
)  # fmt: skip
def test_tune_requests_are_bounded(tasks, budget, n_val, match):
    with pytest.raises(ValueError, match=match):
        check_tune_request(tasks, ["sql", "json"], budget, n_val)
    with pytest.raises(ValueError, match="unknown method"):
        SearchSpace(methods=("ties", "magic"))


# ---------------------------------------------------------------------------------------- the CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixserve.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin"})  # fmt: skip


@needs_demo
def test_mixserve_tune_writes_a_mix_that_merge_accepts(tmp_path):
    r = _cli("tune", "--tasks", "sql,json", "--budget", "3", "--n-val", "3", "--n-test", "3", "--out",
             str(tmp_path / "best.json"), "--report", str(tmp_path / "report"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "3/3 trials" in r.stderr and "test split, scored once" in r.stdout
    best = json.loads((tmp_path / "best.json").read_text())
    assert [c.adapter for c in parse_mix(best).children] == ["sql", "json"]
    report = json.loads((tmp_path / "report" / "tune.json").read_text())
    assert len(report["trials"]) == 3 and report["test"]["n_per_task"] == 3
    lo, hi = report["test"]["intervals"]["mean_kept"]  # a bootstrap over held-out units, around the estimate
    assert lo <= report["test"]["mean_kept"] <= hi and report["test"]["held_out_units"]["sql"] == 3
    assert (tmp_path / "report" / "tune.md").read_text().startswith("# Mix tuning")
    merged = tmp_path / "merged"
    r = _cli("merge", "--adapter", f"sql={DEMO / 'adapters' / 'sql'}", "--adapter", f"json={DEMO / 'adapters' / 'json'}",
             "--mix", str(tmp_path / "best.json"), "--out", str(merged), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (merged / "adapter_model.safetensors").is_file()


@needs_demo
@pytest.mark.parametrize(
    "args,message",
    [(["--tasks", "sql,nope"], "unknown task(s) 'nope'"), (["--budget", "0"], "budget must be between 1"),
     (["--methods", "ties,magic"], "unknown method(s) magic")],
)  # fmt: skip
def test_mixserve_tune_bad_input_is_one_line(tmp_path, args, message):
    r = _cli("tune", *args, "--out", str(tmp_path / "x.json"), cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------- the admin jobs
TOKEN = "tune-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token=TOKEN, max_batch=8)
    with running_server(config) as (url, _app):
        yield url


def _wait(url: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/admin/mixes/tune/{job_id}", headers=ADMIN).json()
        if job["status"] != "running":
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


@needs_demo
def test_admin_tune_job_runs_beside_serving_and_pins_the_winner(server):
    url = server
    body = {
        "tasks": ["sql", "json"],
        "budget": 3,
        "n_val": 3,
        "pin_as": "tuned",
        "methods": ["task_arithmetic", "ties"],
    }
    r = httpx.post(url + "/admin/mixes/tune", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "running" and job["budget"] == 3
    busy = httpx.post(url + "/admin/mixes/tune", json=body, headers=ADMIN, timeout=30)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "tune_busy"
    # Serving goes on meanwhile.
    g = httpx.post(url + "/generate", json={"prompt": "### task: json\n### input: meet pudo, a pifu aged 37 from "
                                            "boto.\n### output:\n", "max_tokens": 8}, timeout=120)  # fmt: skip
    assert g.status_code == 200
    done = _wait(url, job["id"])
    assert done["status"] == "completed", done
    assert done["trials_done"] == 3 and len(done["trials"]) == 3 and done["pinned_as"] == "tuned"
    assert set(done["validation_reference"]) == {"sql", "json"}
    assert done["best"]["mix"]["method"] in ("task_arithmetic", "ties")
    models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert "tuned" in models
    listed = httpx.get(url + "/admin/mixes/tune", headers=ADMIN).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and "trials" not in listed[0]


@needs_demo
def test_admin_tune_job_cancel_frees_the_slot(server):
    url = server
    r = httpx.post(url + "/admin/mixes/tune", json={"tasks": ["sql"], "budget": 200, "n_val": 20}, headers=ADMIN)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    time.sleep(1.0)
    c = httpx.delete(f"{url}/admin/mixes/tune/{job_id}", headers=ADMIN, timeout=60)
    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert httpx.get(url + "/admin/cache", headers=ADMIN).json()["kv_blocks_free"] == httpx.get(
        url + "/admin/cache", headers=ADMIN).json()["kv_blocks"]  # fmt: skip
    # The slot is free again: a new job starts (and is cancelled at once).
    r = httpx.post(url + "/admin/mixes/tune", json={"tasks": ["sql"], "budget": 1, "n_val": 1}, headers=ADMIN)
    assert r.status_code == 202
    httpx.delete(f"{url}/admin/mixes/tune/{r.json()['id']}", headers=ADMIN, timeout=60)


@needs_demo
@pytest.mark.parametrize(
    "body,status,fragment",
    [({"tasks": ["nope"]}, 400, "unknown task"), ({"budget": 0}, 400, "budget"), ({"n_val": 10**6}, 400, "n_val"),
     ({"tasks": ["sql"], "adapters": ["ghost"]}, 400, "unknown adapter"), ({"methods": ["magic"]}, 400, "unknown method"),
     ({"space": "weird"}, 400, "space"), ({"pin_as": "bad name!"}, 400, "must match"), ({"pin_as": "sql"}, 409, "already"),
     ({"nonsense": 1}, 400, "unknown field")],
)  # fmt: skip
def test_admin_tune_bad_requests(server, body, status, fragment):
    before = httpx.get(server + "/admin/cache", headers=ADMIN).json()["merges"]
    r = httpx.post(server + "/admin/mixes/tune", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(server + "/admin/cache", headers=ADMIN).json()["merges"] == before  # nothing merged or cached
    assert httpx.post(server + "/admin/mixes/tune", json=body).status_code == 401
    assert httpx.get(server + "/admin/mixes/tune/nojob", headers=ADMIN).status_code == 404


@needs_demo
def test_new_methods_serve_in_requests_pins_and_nested_mixes(server):
    nested = {"method": "tsv", "children": [
        {"method": "della", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]},
        {"method": "breadcrumbs", "density": 0.9, "space": "dense", "children": [{"adapter": "pystr"}, {"adapter": "python"}]},
    ]}  # fmt: skip
    r = httpx.post(server + "/generate", json={"prompt": "### task: json\n### input: meet pudo, a pifu aged 37 from "
                                               "boto.\n### output:\n", "mix": nested, "max_tokens": 8}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    pin = {"method": "iso_cts", "lambda": 1.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
    r = httpx.post(server + "/admin/mixes", json={"name": "iso-pin", "mix": pin}, headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["method"] == "iso_cts", r.text
    bad = {"method": "della", "epsilon": 0.9, "children": [{"adapter": "sql"}]}
    r = httpx.post(server + "/generate", json={"prompt": "x", "mix": bad, "max_tokens": 2})
    assert r.status_code == 400 and "epsilon" in r.json()["error"]["message"]
