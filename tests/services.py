"""Helpers for the tests that start real services (PostgreSQL, an MLflow server, the MLflow UI)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ablate_command() -> list[str]:
    script = Path(sys.executable).parent / "ablate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ablate.cli"]


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
            return


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the service's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def start_mlflow_server(backend_uri: str, work: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, serving artifacts from `work/artifacts`; (process, URL).

    The process leads a group of its own: `stop(process)` ends it and its workers."""
    port, log = free_port(), work / "mlflow-server.log"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", backend_uri),
        *("--artifacts-destination", str(work / "artifacts"), "--serve-artifacts"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    # tracking needs no job runner (it serves GenAI jobs; on this small host it only slows start and stop)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server, log, timeout=180)  # the first start creates the schema
    except BaseException:
        stop(server)
        raise
    return server, url


PG_USER, PG_PASSWORD, PG_DATABASE = "ablate", "ablate-test", "mlflow"


def postgres_bin() -> Path | None:
    """The directory holding initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent  # a link to the real bin dir holds pg_ctl and createdb too
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only."""

    bin: Path
    root: Path
    port: int

    def _as_owner(self, *args: str) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the `postgres` system user instead
        command = [str(self.bin / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, *args: str) -> None:
        done = subprocess.run(self._as_owner(*args), cwd=self.root, capture_output=True, text=True)
        assert done.returncode == 0, f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(PG_PASSWORD + "\n")
        self._run(
            "initdb",
            "-D",
            str(self.root / "data"),
            "-U",
            PG_USER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",  # over TCP, as the MLflow server connects: password required
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.log), "-o", options, "-w", "start")
        self._run("createdb", "-h", str(self.root), "-p", str(self.port), "-U", PG_USER, PG_DATABASE)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def uri(self) -> str:
        # name the driver: SQLAlchemy's default for postgresql:// changed between versions
        return f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{PG_DATABASE}"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def postgres_missing() -> str | None:
    """Why a throwaway PostgreSQL cluster cannot start here, or None if it can."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
    if os.geteuid() == 0 and not _has_user("postgres"):
        return "running as root needs a `postgres` system user to own the test cluster"
    return None


def throwaway_postgres() -> Postgres:
    """A cluster (not started) in a new temporary directory; as root, owned by the `postgres` user."""
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="ablate-pg-", dir="/tmp" if as_root else None))
    if as_root:  # the cluster's owner is the postgres user: give it the directory (/tmp lets it reach it)
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    return Postgres(postgres_bin(), root, free_port())


@dataclass
class TrackingServer:
    url: str  # the MLflow server
    artifacts: Path  # where the server stores artifacts
    postgres: Postgres | None  # the cluster behind it; None: SQLite, where PostgreSQL cannot start


@contextlib.contextmanager
def tracking_server() -> Iterator[TrackingServer]:
    """`mlflow server` on a throwaway PostgreSQL cluster where one can start here (`postgres_missing`),
    else on SQLite; on leaving, both are stopped and their folders removed."""
    work = Path(tempfile.mkdtemp(prefix="ablate-mlflow-"))
    postgres = throwaway_postgres() if postgres_missing() is None else None
    server = None
    try:
        if postgres is not None:
            postgres.start()
        backend = postgres.uri() if postgres is not None else f"sqlite:///{work / 'mlflow.db'}"
        server, url = start_mlflow_server(backend, work)
        yield TrackingServer(url, work / "artifacts", postgres)
    finally:
        if server is not None:
            stop(server)
            assert server.returncode is not None, "the MLflow server did not stop"
        if postgres is not None:
            if (postgres.root / "data" / "postmaster.pid").exists():
                postgres.stop()
            shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
