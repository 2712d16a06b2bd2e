"""Several profile workers on one store: every job measured exactly once; dead workers' claims are taken over."""

import multiprocessing as mp
import time

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


def test_two_processes_share_one_sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    MeasurementStore(url).close()  # create the tables once, before the workers race
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, f"w{i}", queue)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    results = sorted(queue.get(timeout=5) for _ in procs)
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
    store.release(key)
    assert store.claim(key, "third", timeout_s=60)


def test_a_dead_workers_job_is_measured_after_its_claim_times_out(tmp_path):
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
