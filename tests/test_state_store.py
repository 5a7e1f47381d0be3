"""The admin state store (issue 36): migrations, atomic writes under SIGKILL, and real servers that
restart with their pins and registrations, follow each other through one store, and keep serving
generation while the store is unavailable."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from loadtest.postgres import Postgres, pg_bin
from server.readiness import free_port, wait_until_ready
from server.store.state_store import SCHEMA_VERSION, StateStore, StoreSchemaError, store_url

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
TIES = {"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}
SQL = ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
       "how many books have author bemi\n### output:\n")  # fmt: skip


# ------------------------------------------------------------------------------------------ the store
def test_migrations_apply_once_and_a_newer_schema_is_refused(tmp_path):
    url = store_url(str(tmp_path / "a" / "state.db"))
    store = StateStore(url)
    assert store.schema_version() == SCHEMA_VERSION == 2 and store.version() == 0
    assert store.put_pin("p", {"adapter": "sql"}) == 1
    store.close()
    again = StateStore(url)  # reopening migrates nothing and keeps the data
    assert again.snapshot().pins["p"].spec == {"adapter": "sql"} and again.version() == 1
    again.close()
    with sqlite3.connect(tmp_path / "a" / "state.db") as conn:
        conn.execute("UPDATE mixserve_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreSchemaError, match="upgrade mixserve"):
        StateStore(url)


def test_a_store_of_the_first_schema_is_upgraded_with_its_data(tmp_path):
    """An upgrade keeps the data: a store written by schema 1 migrates to the current one on open."""
    import sqlalchemy as sa

    from server.store import state_store

    url = store_url(str(tmp_path / "old.db"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # what a schema-1 mixserve wrote
        conn.execute(sa.text("CREATE TABLE mixserve_schema (version INTEGER NOT NULL)"))
        for statement in state_store.MIGRATIONS[0][1]:
            conn.execute(sa.text(statement))
        conn.execute(sa.text("INSERT INTO mixserve_schema (version) VALUES (1)"))
        conn.execute(sa.text("UPDATE mixserve_version SET version = 3"))
        conn.execute(
            sa.text("INSERT INTO mixserve_pins (name, spec, updated, version) VALUES ('old', '\"sql\"', 0, 3)")
        )
    engine.dispose()
    store = StateStore(url)
    pin = store.snapshot().pins["old"]
    assert store.schema_version() == SCHEMA_VERSION and pin.spec == "sql" and pin.key is None and store.version() == 3
    store.put_pin("new", "json", "k" * 64)
    assert store.snapshot().pins["new"].key == "k" * 64


def test_every_write_advances_the_version_and_the_later_pin_wins(tmp_path):
    store = StateStore(store_url(str(tmp_path / "s.db")))
    store.put_adapter("code", "python", "f" * 64)
    store.put_pin("m", TIES)
    store.put_pin("m", "sql")
    store.put_tune_result("job1", {"best": {"score": 0.9}})
    store.delete_pin("gone")  # deleting what is not there is a write too (idempotent)
    snap = store.snapshot()
    assert snap.version == 5 and snap.pins["m"].spec == "sql"
    assert snap.adapters["code"].path == "python" and snap.tune_results["job1"]["best"]["score"] == 0.9
    store.delete_pin("m")
    assert "m" not in store.snapshot().pins


_WRITER = """
import sys
from server.store.state_store import StateStore, store_url
store = StateStore(store_url(sys.argv[1]))
i = 0
while True:
    i += 1
    store.put_pin(f"p{i % 50}", {"method": "linear", "children": [{"adapter": "sql", "weight": i}]})
    store.put_adapter(f"a{i % 7}", f"dir{i}", f"{i:064d}")
    if i % 3 == 0:
        store.delete_pin(f"p{(i * 7) % 50}")
    print(i, flush=True)
"""


def test_sigkill_in_the_middle_of_writes_leaves_the_before_or_the_after(tmp_path):
    """A writer killed at random moments, 20 times: the database is intact, every row whole, and the
    version counter agrees with the rows (each row carries the version of the write that made it)."""
    db = tmp_path / "k.db"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for cycle in range(20):
        proc = subprocess.Popen([sys.executable, str(script), str(db)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # it has written at least once
        time.sleep(0.02 + 0.013 * (cycle % 7))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = StateStore(store_url(str(db)))
        snap = store.snapshot()
        store.close()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            versions = [v for (v,) in conn.execute(
                "SELECT version FROM mixserve_pins UNION ALL SELECT version FROM mixserve_adapters")]  # fmt: skip
        assert versions and max(versions) <= snap.version
        for pin in snap.pins.values():
            assert pin.spec["children"][0]["adapter"] == "sql"
        for a in snap.adapters.values():
            assert a.path.startswith("dir") and len(a.fingerprint) == 64


# ------------------------------------------------------------------------------------- real servers
class Server:
    """``mixserve serve`` as a subprocess on a free port with its admin API open."""

    def __init__(self, state: str, adapters: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixserve.cli", "serve", "--port", str(self.port), "--adapters", str(adapters),
               "--state", state, "--insecure-admin", "--max-batch", "4", "--log-level", "warning", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_until_ready(self.url, timeout=120, proc=self.proc)

    def get(self, path: str) -> dict:
        return httpx.get(self.url + path, timeout=30).json()

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def complete(self, model: str) -> httpx.Response:
        return self.post("/v1/completions", {"model": model, "prompt": SQL, "max_tokens": 8, "temperature": 0})

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


@pytest.fixture
def adapters(tmp_path) -> Path:
    """A copy of the demo adapters (tests delete and change them)."""
    root = tmp_path / "adapters"
    shutil.copytree(DEMO / "adapters", root)
    shutil.copytree(root / "python", root / "extra" / "code")
    return root


@pytest.mark.slow
def test_pins_and_registrations_come_back_after_a_restart_and_sigkill(tmp_path, adapters):
    state = str(tmp_path / "state.db")
    a = Server(state, adapters)
    try:
        assert a.post("/admin/adapters", {"name": "code", "path": "extra/code"}).status_code == 200
        assert a.post("/admin/mixes", {"name": "ties-mix", "mix": TIES}).status_code == 200
        assert a.post("/admin/mixes", {"name": "code-mix", "mix": {"method": "linear", "children": [
            {"adapter": "code"}, {"adapter": "sql"}]}}).status_code == 200  # fmt: skip
        assert a.post("/admin/mixes", {"name": "short-lived", "mix": "sql"}).status_code == 200
        assert httpx.delete(a.url + "/admin/mixes/short-lived", timeout=30).status_code == 200
        before = {m: a.complete(m).json()["choices"][0]["text"] for m in ("ties-mix", "code-mix")}
    finally:
        a.stop(signal.SIGKILL)  # no drain, no shutdown hook: only what the store has
    # A tune job's result as the job writes it when it ends (tests/test_tune_jobs_unit.py checks that write).
    store = StateStore(store_url(state))
    store.put_tune_result("job42", {"id": "job42", "status": "completed", "best": {"mix": TIES}, "trials": [{}]})
    store.close()
    b = Server(state, adapters)
    try:
        assert set(b.get("/ready")["pins"]) >= {"ties-mix", "code-mix"} and "short-lived" not in b.get("/ready")["pins"]
        assert "code" in b.get("/ready")["adapters"]
        assert {m: b.complete(m).json()["choices"][0]["text"] for m in before} == before
        mixes = b.get("/admin/mixes")
        assert mixes["not_restored"] == {} and mixes["store"]["kind"] == "sqlite"
        assert {p["name"]: p["mix"] for p in mixes["pins"]}["ties-mix"] == TIES
        jobs = {j["id"]: j for j in b.get("/admin/mixes/tune")["jobs"]}
        assert jobs["job42"]["best"]["mix"] == TIES and b.get("/admin/mixes/tune/job42")["trials"] == [{}]
    finally:
        b.stop()
    shutil.rmtree(adapters / "extra")  # an adapter gone: its pin is reported, the others still served
    for f in (adapters / "json").iterdir():  # an adapter changed: its pins are served and reported
        shutil.copy(adapters / "pystr" / f.name, f)
    c = Server(state, adapters)
    try:
        problems = c.get("/admin/mixes")["not_restored"]
        assert "code" in problems and "not restored" in problems["code-mix"] and "ties-mix" in c.get("/ready")["pins"]
        assert "changed since it was pinned" in problems["ties-mix"]
        assert c.complete("ties-mix").status_code == 200
    finally:
        c.stop()


@pytest.mark.slow
def test_two_servers_on_one_store_follow_each_other_and_survive_a_locked_store(tmp_path, adapters):
    state = str(tmp_path / "shared.db")
    a, b = Server(state, adapters), Server(state, adapters)
    try:
        t0 = time.monotonic()
        assert a.post("/admin/mixes", {"name": "shared", "mix": TIES}).status_code == 200
        while b.complete("shared").status_code != 200:
            assert time.monotonic() - t0 < 2.0, "the pin did not reach the other server within 2 s"
            time.sleep(0.05)
        assert httpx.delete(b.url + "/admin/mixes/shared", timeout=30).status_code == 200
        t0 = time.monotonic()
        while a.complete("shared").status_code != 404:
            assert time.monotonic() - t0 < 2.0
            time.sleep(0.05)
        # Two admins pin one name at once, on the two servers: both answered, the later write wins
        # everywhere (the store's order), and both servers converge on it.
        specs = [{"method": "linear", "children": [{"adapter": "sql", "weight": w}, {"adapter": "json"}]}
                 for w in (0.25, 0.75)]  # fmt: skip
        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda sv: sv[0].post("/admin/mixes", {"name": "raced", "mix": sv[1]}),
                                    zip((a, b), specs, strict=True)))  # fmt: skip
        assert [r.status_code for r in answers] == [200, 200]
        stored = StateStore(store_url(state)).snapshot().pins["raced"].spec
        t0 = time.monotonic()
        while not all({p["name"]: p["mix"] for p in s.get("/admin/mixes")["pins"]}.get("raced") == stored
                      for s in (a, b)):  # fmt: skip
            assert time.monotonic() - t0 < 2.0, "the servers did not converge on the store's pin"
            time.sleep(0.05)
        # The store locked by another writer past its timeout: admin writes 503 (nothing changed),
        # generation goes on; once released, writes succeed again.
        lock = sqlite3.connect(state, timeout=1, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            r = a.post("/admin/mixes", {"name": "while-locked", "mix": "sql"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert a.complete("sql").status_code == 200
            assert "while-locked" not in a.get("/ready")["pins"]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert a.post("/admin/mixes", {"name": "after", "mix": "sql"}).status_code == 200
        c = Server(state, adapters)  # a server started later has it
        try:
            assert "after" in c.get("/ready")["pins"]
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture
def postgres():
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        pytest.skip("needs PostgreSQL's server binaries (Debian: apt-get install postgresql; .ci/run installs it)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("starts PostgreSQL as the 'postgres' user: needs root and runuser")
    # Not under pytest's tmp_path: its root-only parent is closed to the postgres user.
    workdir = Path(tempfile.mkdtemp(prefix="mixserve-pg-"))
    try:
        pg = Postgres(workdir)
        yield pg
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_a_fleet_on_postgresql_shares_pins_and_rides_out_the_database_going_down(postgres, adapters):
    a, b = Server(postgres.url, adapters), Server(postgres.url, adapters)
    try:
        t0 = time.monotonic()
        assert a.post("/admin/mixes", {"name": "fleet", "mix": TIES}).status_code == 200
        while b.complete("fleet").status_code != 200:
            assert time.monotonic() - t0 < 2.0, "the pin did not reach the other replica within 2 s"
            time.sleep(0.05)
        assert b.get("/admin/mixes")["store"]["kind"] == "postgresql"
        postgres.stop()
        try:
            for server in (a, b):  # generation goes on; admin writes say why they cannot
                assert server.complete("fleet").status_code == 200
                r = server.post("/admin/mixes", {"name": "while-down", "mix": "sql"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            late = Server(postgres.url, adapters)  # a replica started while the database is down serves
            assert late.get("/ready")["store"]["reachable"] is False and late.complete("sql").status_code == 200
        finally:
            postgres.start()
        t0 = time.monotonic()
        while late.complete("fleet").status_code != 200:  # and catches up once it answers
            assert time.monotonic() - t0 < 15, "the replica started during the outage did not catch up"
            time.sleep(0.2)
        late.stop()
        t0 = time.monotonic()
        while a.post("/admin/mixes", {"name": "back", "mix": "sql"}).status_code != 200:
            assert time.monotonic() - t0 < 15, "admin writes did not recover once the database came back"
            time.sleep(0.5)
        c = Server(postgres.url, adapters)  # a replica started later has every pin
        try:
            assert {"fleet", "back"} <= set(c.get("/ready")["pins"])
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_a_short_crash_soak_loses_nothing():
    """loadtest/state_soak.py for 3 cycles (the committed run has 100): SIGKILL under generation load in
    the middle of admin writes, every acknowledged write there after each restart."""
    from types import SimpleNamespace

    from loadtest.state_soak import run

    result = run(SimpleNamespace(cycles=3, seed=7))
    assert result["lost"] == [] and result["generation"]["ok"] > 0
    assert result["acknowledged_writes"]["pin"] > 0 and result["acknowledged_writes"]["tune"] == 1
