"""A throwaway PostgreSQL cluster on 127.0.0.1 from Debian's server binaries, run as the ``postgres``
user (the server refuses root): for the state store's fleet test and the propagation benchmark."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from server.readiness import free_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class Postgres:
    """A throwaway PostgreSQL cluster (Debian's binaries, run as the ``postgres`` user) on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.port = workdir, free_port()
        self.data = workdir / "data"
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.chown(workdir, "postgres")
        self._as_postgres(pg_bin("initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres")
        self.start()
        subprocess.run([pg_bin("psql") or "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                        "CREATE DATABASE mixserve"], check=True, capture_output=True)  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mixserve"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w",
                          "start")  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
