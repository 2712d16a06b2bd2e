"""Several profile workers on one store: every job measured exactly once; dead workers' claims are taken over."""

import multiprocessing as mp
import time

import pytest
import torch

from circtune.measure.device import describe_device
from circtune.measure.profiler import ProfileSettings, jobs_for, plan_shapes, run_profile
from circtune.measure.store import MeasurementKey, MeasurementStore
from circtune.measure.timing import TimingSettings
from circtune.models import resolve_model
from circtune.space import Candidate, parse_space

SPACE = {"methods": ["c3a", "cdvft"], "block_sizes": [16, 32], "factors": [2], "transforms": ["rfft"],
         "backends": ["torch", "dense"]}


def _plans():
    return plan_shapes(resolve_model("tiny_models:two_shapes", ["up", "square"]), parse_space(SPACE), "cpu",
                       peft=False)


def _settings():
    return ProfileSettings(tokens=16, dtypes=("fp32",), device=torch.device("cpu"),
                           timing=TimingSettings(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0))


def _worker(url: str, name: str, queue) -> None:
    import sys

    sys.path.insert(0, "tests")
    torch.set_num_threads(1)
    result = run_profile(_plans(), _settings(), MeasurementStore(url), describe_device("cpu", threads=1),
                         progress=False, worker=name, poll_s=0.05)
    queue.put((name, result.measured, result.reused, len(result.measurements)))


def run_two_workers(url: str, prefix: str) -> list[tuple]:
    """Two profile workers in spawned processes on one store; (name, measured, reused, rows) of each."""
    MeasurementStore(url).close()  # create the tables once, before the workers race
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, f"{prefix}{i}", queue)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    return sorted(queue.get(timeout=5) for _ in procs)


@pytest.mark.slow
def test_two_processes_share_one_sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    results = run_two_workers(url, "w")
    n_jobs = len(jobs_for(_plans(), ("fp32",)))
    assert sum(r[1] for r in results) == n_jobs  # measured exactly once between them
    assert all(r[3] == n_jobs for r in results)  # and each worker ends with the whole table
    store = MeasurementStore(url)
    assert len(store.query()) == n_jobs


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    store = MeasurementStore(tmp_path / "m.db")
    key = MeasurementKey("fp", "t", "", "c", 64, 64, 16, "fp32", Candidate("c3a", 16, None, "rfft", "torch"))
    assert store.claim(key, "alive", timeout_s=60)
    assert store.claim(key, "alive", timeout_s=60)  # its own claim
    assert not store.claim(key, "other", timeout_s=60)
    time.sleep(0.05)
    assert store.claim(key, "other", timeout_s=0.01)  # "alive" stopped answering: taken over
    assert not store.claim(key, "alive", timeout_s=60)
    store.release(key, "alive")  # not its claim any more: left alone
    assert not store.claim(key, "third", timeout_s=60)
    store.release(key, "other")
    assert store.claim(key, "third", timeout_s=60)


def test_a_dead_workers_job_is_measured_after_its_claim_times_out(tmp_path, one_thread):
    import sys

    sys.path.insert(0, "tests")
    store = MeasurementStore(tmp_path / "m.db")
    info = describe_device("cpu")
    plans = _plans()
    sw = info.software
    job = jobs_for(plans, ("fp32",))[1]
    key = MeasurementKey(info.fingerprint, sw["torch"], sw.get("triton") or "", sw["circtune"], job.d_in,
                         job.d_out, 16, "fp32", job.candidate)
    assert store.claim(key, "crashed-worker")
    time.sleep(0.3)
    result = run_profile(plans, _settings(), store, info, progress=False, claim_timeout_s=0.2, poll_s=0.05)
    assert result.measured == len(jobs_for(plans, ("fp32",))) and not result.failed


@pytest.mark.slow
def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    store = MeasurementStore(tmp_path / "m.db")
    key = MeasurementKey("fp", "t", "", "c", 64, 64, 16, "fp32", Candidate("c3a", 16, None, "rfft", "torch"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{int(gone.stdout)}"
    alive = f"{socket.gethostname()}:{__import__('os').getpid()}"
    assert store.claim(key, dead)
    assert store.claim(key, "somebody-else:1")  # the dead process's claim does not wait for the timeout
    store.release(key, "somebody-else:1")
    assert store.claim(key, alive)
    assert not store.claim(key, "somebody-else:1")  # a live process's claim is respected


def _profile_cmd(out, store):
    return ["profile", "--model", "tiny_models:two_shapes", "--targets", "up,square", "--space", "default",
            "--tokens", "64", "--threads", "1", "--warmup", "0", "--min-reps", "3", "--max-reps", "3",
            "--min-time", "0", "--no-peft", "--quiet", "--out", str(out), "--store", str(store)]


def _rows(store_path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(store_path, timeout=30) as con:
            return con.execute("select count(*) from circtune_measurements").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_sigkill_mid_profile_then_rerun_loses_and_duplicates_nothing(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    from circtune.cli.main import main

    store = tmp_path / "m.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["tests", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "circtune.cli.main", *_profile_cmd(tmp_path / "out", store)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _rows(store) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _rows(store)
    assert kept >= 5
    assert main(_profile_cmd(tmp_path / "out", store)) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    total = _rows(store)
    measured, reused = (int(summary.split(" measured, ")[0]), int(summary.split(", ")[1].split(" already")[0]))
    assert reused == kept and measured == total - kept  # nothing lost, nothing measured twice
    import pandas as pd

    frame = pd.read_csv(tmp_path / "out" / "measurements.csv")
    assert len(frame) == total and not frame.duplicated(["d_in", "d_out", "method", "block_size", "factors",
                                                         "transform", "backend"]).any()


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_summary(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    store = tmp_path / "m.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["tests", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "circtune.cli.main", *_profile_cmd(tmp_path / "out", store)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _rows(store) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    import re

    found = re.search(r"interrupted; kept in the store: (\d+) configurations measured in this run", last)
    assert found and int(found.group(1)) == _rows(store) >= 3  # the one line says what was kept
    assert "Traceback" not in err
    import sqlite3

    with sqlite3.connect(store) as con:  # the claim of the job in flight was released
        assert con.execute("select count(*) from circtune_claims").fetchone()[0] == 0
