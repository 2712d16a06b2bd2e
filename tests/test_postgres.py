"""Profile and search workers on one real PostgreSQL database (a throw-away server on loopback, started here).

Debian's PostgreSQL server binaries are used from /usr/lib/postgresql/*/bin; the server runs as the ``postgres``
user when the tests run as root (initdb refuses root), in a fresh data folder, on a free port, and is stopped at
the end. Skipped, with the reason, only when no server binaries or no psycopg driver can be found; .ci/run installs
the binaries when missing and then sets CIRCTUNE_REQUIRE_POSTGRES=1, which turns such a skip into a failure.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from test_search import check_search_workers, run_search_workers
from test_workers import _plans, run_two_workers

pytestmark = pytest.mark.slow  # a database server and several processes


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A throw-away server; yields a function that creates a fresh database and returns its URL."""
    required = os.environ.get("CIRCTUNE_REQUIRE_POSTGRES") == "1"  # set by .ci/run once the server is there
    skip = pytest.fail if required else pytest.skip
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip("PostgreSQL driver not installed (pip install 'circtune[postgres]')")
    bindir = _bindir()
    if bindir is None:
        skip("no PostgreSQL server binaries in /usr/lib/postgresql (apt-get install postgresql)")
    data = tempfile.mkdtemp(prefix="circtune-pg-", dir="/tmp")
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "circtune")
    run(f"{bindir}/pg_ctl", "-D", f"{data}/db", "-l", f"{data}/log", "-w", "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")

    def new_database(name: str) -> str:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "circtune", name)
        return f"postgresql://circtune@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_profile_workers_on_postgres_measure_every_job_once(postgres_server):
    from circtune.measure.profiler import jobs_for
    from circtune.measure.store import MeasurementStore

    postgres_url = postgres_server("profile")
    started = time.perf_counter()
    results = run_two_workers(postgres_url, "pg")
    elapsed = time.perf_counter() - started
    n_jobs = len(jobs_for(_plans(), ("fp32",)))
    assert sum(r[1] for r in results) == n_jobs, results  # no job measured twice, none skipped
    assert all(r[3] == n_jobs for r in results)
    store = MeasurementStore(postgres_url)
    assert len(store.query()) == n_jobs
    print(f"two workers on PostgreSQL: {n_jobs} jobs, measured {[r[1] for r in results]}, {elapsed:.1f} s")


def test_two_search_commands_on_postgres_share_one_study(postgres_server, tmp_path):
    url = postgres_server("search")
    started = time.perf_counter()
    command, results = run_search_workers(url, tmp_path)
    elapsed = time.perf_counter() - started
    print(f"two search workers on PostgreSQL: {check_search_workers(url, command, results)}, {elapsed:.1f} s")
