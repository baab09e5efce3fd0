"""Throw-away PostgreSQL clusters and real MLflow tracking servers, for the scale-out tests and the soak.

Library module for tests/test_scale_out.py and scripts/soak.py; nothing to launch:

    with postgres_cluster(("kdlab", "mlflow")) as pg:      # initdb + pg_ctl start on 127.0.0.1:<free port>
        pg.url("kdlab")                                     # postgresql+psycopg2://postgres@127.0.0.1:PORT/kdlab
        with mlflow_server(pg.url("mlflow"), artifacts) as uri:   # http://127.0.0.1:PORT, /health answered
            ...

The cluster uses Debian's (or any) PostgreSQL binaries: `initdb`, `pg_ctl`, `postgres`. They refuse
to run as root, so as root they run as the `postgres` system user (`runuser -u postgres --`) in a
fresh folder under the system temp dir that user owns. The server listens on 127.0.0.1 only, trusts
local connections (no password: it is a throw-away), and is always stopped (`pg_ctl stop -m fast`)
and its folder removed on the way out, also on failure. `PostgresUnavailable` says in one line why a
cluster could not be started; the pytest fixtures turn it into a skip, or a failure when
KDLAB_REQUIRE_POSTGRES=1 (set by .ci/run, which installs PostgreSQL when it is missing).
"""
from __future__ import annotations

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_USER = "postgres"  # the cluster's superuser, and the system user the binaries run as under root
MLFLOW_HEALTH_TIMEOUT_S = 180  # ~25 s on a quiet 2-core machine (../shared/STACK.md); more when it is busy


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries, driver or system user missing, or the start failed)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                    key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    raise PostgresUnavailable("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")


@dataclass
class PostgresCluster:
    port: int
    bindir: Path
    root: Path
    run_as: list

    def url(self, database: str = "kdlab") -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name)
        return self.url(name)

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.run_as, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, check=False)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"{tool} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc


def _run_as() -> list:
    """Prefix that runs the PostgreSQL binaries as a non-root user (they refuse root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no '{PG_USER}' system user to run PostgreSQL as "
                                  "(apt-get install postgresql creates it)") from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root and `runuser` is missing: cannot drop to the postgres user")
    return ["runuser", "-u", PG_USER, "--"]


@contextmanager
def postgres_cluster(databases: tuple = ("kdlab",)) -> Iterator[PostgresCluster]:
    """Start a throw-away cluster on 127.0.0.1:<free port> with `databases` created; stop and delete it after."""
    try:
        import psycopg2  # noqa: F401  the driver SQLAlchemy (Optuna, MLflow) needs for postgresql+psycopg2://
    except ImportError:
        raise PostgresUnavailable("the psycopg2 driver is not installed: pip install psycopg2-binary") from None
    bindir = postgres_bindir()
    run_as = _run_as()
    # Under the system temp dir, not pytest's tmp_path: the postgres user must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="kdlab-pg-"))
    if run_as:
        entry = pwd.getpwnam(PG_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(free_port(), bindir, root, run_as)
    data, log = root / "data", root / "server.log"
    try:
        cluster._pg("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "--encoding=UTF8", "--locale=C",
                    "--no-sync")
        # fsync off: a throw-away cluster need not survive a power cut; it makes every commit much cheaper.
        options = f"-h 127.0.0.1 -p {cluster.port} -k {root} -F -c max_connections=200"
        try:
            cluster._pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        except PostgresUnavailable as exc:
            tail = log.read_text(errors="replace").strip()[-500:] if log.is_file() else ""
            raise PostgresUnavailable(f"{exc} {tail}".strip()) from None
        for name in databases:
            cluster.create_database(name)
        yield cluster
    finally:
        if (data / "postmaster.pid").exists():  # also when pg_ctl gave up waiting on a server that did start
            subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- MLflow tracking server


def wait_for_health(uri: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.is_file() else ""
            raise RuntimeError(f"mlflow server exited {proc.returncode} before answering /health\n{tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"mlflow server at {uri} did not answer /health within {timeout_s:.0f} s")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group (the server and its workers), SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


@contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: Path, workers: int = 2, port: int | None = None,
                  log: Path | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a database backend (PostgreSQL or SQLite URL); yields its URI.

    Artefacts are proxied (`--artifacts-destination`): clients upload through the server, which is what
    workers on other machines need; with `--default-artifact-root DIR` each client would write to DIR
    on its own disk.
    """
    port = port or free_port()
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log is not None else artifacts_dir.parent / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(uri, proc, MLFLOW_HEALTH_TIMEOUT_S, log)
        yield uri
    finally:
        stop_process_group(proc)


# ---------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # scripts/soak.py uses the context managers above without pytest
    pytest = None


def _unavailable(reason: str) -> None:
    if os.environ.get("KDLAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (KDLAB_REQUIRE_POSTGRES=1) but: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


if pytest is not None:
    @pytest.fixture(scope="session")
    def postgres() -> Iterator[PostgresCluster]:
        """A session-wide throw-away cluster with the databases `kdlab` (Optuna) and `mlflow` created."""
        try:
            with postgres_cluster(("kdlab", "mlflow")) as cluster:
                yield cluster
        except PostgresUnavailable as exc:
            _unavailable(str(exc))

    @pytest.fixture(scope="session")
    def postgres_url(postgres) -> str:
        """postgresql+psycopg2://postgres@127.0.0.1:PORT/kdlab on the session's cluster."""
        return postgres.url("kdlab")
