"""Admin state that outlives the process: pins, adapter registrations and tune results.

One small interface (:class:`StateStore`) over SQLAlchemy Core, so the same schema and the same code
serve an embedded SQLite file (the default: ``--state PATH``) and a PostgreSQL database shared by a
fleet (``--state postgresql+psycopg://...``). Every write is one transaction that also advances a
version counter: a process killed in the middle leaves the before or the after, never half (SQLite in
WAL mode with ``synchronous=FULL``, committed before the admin call answers). Replicas follow the
store by polling that counter (:meth:`StateStore.version`, one indexed row) and reading a
:class:`Snapshot` when it moves.

The schema is versioned: :data:`MIGRATIONS` are applied in order at open, each in its own transaction,
and recorded in ``mixserve_schema``; a store written by a newer mixserve is refused, not guessed at.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

# Each migration: the schema version it brings the store to and its statements (portable SQL: SQLite
# and PostgreSQL). Append; never edit one that has shipped.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE mixserve_version (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)",
        "INSERT INTO mixserve_version (id, version) VALUES (1, 0)",
        "CREATE TABLE mixserve_pins (name VARCHAR(64) PRIMARY KEY, spec TEXT NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL, version BIGINT NOT NULL)",
        "CREATE TABLE mixserve_adapters (name VARCHAR(64) PRIMARY KEY, path TEXT NOT NULL, "
        "fingerprint VARCHAR(128) NOT NULL, updated DOUBLE PRECISION NOT NULL, version BIGINT NOT NULL)",
        "CREATE TABLE mixserve_tune_results (id VARCHAR(64) PRIMARY KEY, record TEXT NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL, version BIGINT NOT NULL)",
    ]),
    # The mix key a pin was merged under (its adapters' fingerprints): a restore can tell an adapter
    # changed since. Pins written before it have none.
    (2, ["ALTER TABLE mixserve_pins ADD COLUMN mix_key VARCHAR(128)"]),
]  # fmt: skip
SCHEMA_VERSION = MIGRATIONS[-1][0]
log = logging.getLogger("mixserve.store")


class StoreUnavailableError(RuntimeError):
    """The store cannot be read or written now (a database down, a disk full): admin writes answer 503."""


class StoreSchemaError(RuntimeError):
    """The store's schema is newer than this mixserve knows (refused at start)."""


@dataclass(frozen=True)
class PinRecord:
    name: str
    spec: Any  # the MixSpec (JSON) or an adapter / pin name
    updated: float
    version: int = 0  # the store version of the write that made it
    key: str | None = None  # the mix key it was merged under (None: pinned before schema 2)


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    path: str  # relative to the adapter root
    fingerprint: str
    updated: float
    version: int = 0


@dataclass
class Snapshot:
    """Everything the store holds at one version."""

    version: int
    pins: dict[str, PinRecord] = field(default_factory=dict)
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    tune_results: dict[str, dict] = field(default_factory=dict)


def store_url(option: str) -> str:
    """``--state``'s value as a SQLAlchemy URL: a URL as it is, a path as a SQLite file (its folder made)."""
    if "://" in option:
        return option
    path = Path(option).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def redact(url: str) -> str:
    """The URL without its password, for logs and answers."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable store URL>"


class StateStore:
    """The admin state in a database (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        args = {"timeout": timeout} if sqlite else {"connect_timeout": max(1, int(timeout))}
        self._engine = sa.create_engine(url, connect_args=args, pool_pre_ping=not sqlite, future=True)
        if sqlite:
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        self._migrated = False
        try:
            self.migrate()
        except StoreUnavailableError as exc:  # a server may start while its database is down
            log.warning("%s; the schema is checked once it answers", exc)

    @property
    def kind(self) -> str:
        return self._engine.dialect.name

    # ------------------------------------------------------------------------------------ schema
    def migrate(self) -> int:
        """Apply the migrations this store lacks; returns the schema version."""
        with self._guard():
            with self._engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS mixserve_schema (version INTEGER NOT NULL)"))
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise StoreSchemaError(f"the state store {redact(self.url)} has schema version {current}; this "
                                       f"mixserve knows up to {SCHEMA_VERSION}: upgrade mixserve")  # fmt: skip
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                with self._engine.begin() as conn:  # one migration, one transaction
                    for statement in statements:
                        conn.execute(sa.text(statement))
                    conn.execute(sa.text("DELETE FROM mixserve_schema"))
                    conn.execute(sa.text("INSERT INTO mixserve_schema (version) VALUES (:v)"), {"v": version})
            self._migrated = True
            return self.schema_version()

    def _ready(self) -> None:
        """Migrate first if the store was unreachable when it was opened."""
        if not self._migrated:
            self.migrate()

    def schema_version(self) -> int:
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(sa.text("SELECT MAX(version) FROM mixserve_schema")).first()
        return int(row[0]) if row and row[0] is not None else 0

    # ------------------------------------------------------------------------------------- reads
    def version(self) -> int:
        """The counter every write advances (what followers poll)."""
        self._ready()
        with self._guard(), self._engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT version FROM mixserve_version WHERE id = 1")).scalar_one())

    def snapshot(self) -> Snapshot:
        """Every pin, registration and tune result, read in one transaction."""
        self._ready()
        with self._guard(), self._engine.begin() as conn:
            version = int(conn.execute(sa.text("SELECT version FROM mixserve_version WHERE id = 1")).scalar_one())
            pins = {r.name: PinRecord(r.name, json.loads(r.spec), r.updated, int(r.version), r.mix_key) for r in
                    conn.execute(sa.text("SELECT name, spec, updated, version, mix_key FROM mixserve_pins"))}  # fmt: skip
            adapters = {r.name: AdapterRecord(r.name, r.path, r.fingerprint, r.updated, int(r.version)) for r in
                        conn.execute(sa.text("SELECT name, path, fingerprint, updated, version FROM mixserve_adapters"))}  # fmt: skip
            tunes = {r.id: json.loads(r.record)
                     for r in conn.execute(sa.text("SELECT id, record FROM mixserve_tune_results"))}  # fmt: skip
        return Snapshot(version, pins, adapters, tunes)

    # ------------------------------------------------------------------------------------ writes
    def put_pin(self, name: str, spec: Any, key: str | None = None) -> int:
        """Pin ``name`` to ``spec`` (merged under mix key ``key``; the later write wins); returns the new version."""
        return self._write("mixserve_pins", "name", name, {"spec": json.dumps(spec, sort_keys=True), "mix_key": key})

    def delete_pin(self, name: str) -> int:
        return self._write("mixserve_pins", "name", name, None)

    def put_adapter(self, name: str, path: str, fingerprint: str) -> int:
        return self._write("mixserve_adapters", "name", name, {"path": path, "fingerprint": fingerprint})

    def delete_adapter(self, name: str) -> int:
        return self._write("mixserve_adapters", "name", name, None)

    def put_tune_result(self, job_id: str, record: dict) -> int:
        return self._write("mixserve_tune_results", "id", job_id, {"record": json.dumps(record, sort_keys=True)})

    def _write(self, table: str, key: str, value: str, columns: dict[str, Any] | None) -> int:
        """Replace (or, ``columns`` None, delete) one row and advance the version, in one transaction."""
        self._ready()
        with self._guard(), self._engine.begin() as conn:
            conn.execute(sa.text("UPDATE mixserve_version SET version = version + 1 WHERE id = 1"))
            version = int(conn.execute(sa.text("SELECT version FROM mixserve_version WHERE id = 1")).scalar_one())
            conn.execute(sa.text(f"DELETE FROM {table} WHERE {key} = :k"), {"k": value})
            if columns is not None:
                names = [key, *columns, "updated", "version"]
                row = {key: value, **columns, "updated": time.time(), "version": version}
                conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                                     f"({', '.join(':' + n for n in names)})"), row)  # fmt: skip
        return version

    def close(self) -> None:
        self._engine.dispose()

    def _guard(self):
        return _Unavailable(self.url)


class _Unavailable:
    """Database errors (the server down, the file locked past the timeout) as :class:`StoreUnavailableError`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            reason = str(exc.orig if getattr(exc, "orig", None) is not None else exc).strip().splitlines()[0]
            raise StoreUnavailableError(f"the state store {redact(self.url)} is unavailable: {reason}") from None
        return False


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: readers never block the writer; FULL: a committed write survives a crash or a power cut.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
