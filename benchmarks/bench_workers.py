"""Wall time of one `circtune search` against N workers on one database, each run on a fresh database.

For every worker count, a new database is made (PostgreSQL: ``CREATE DATABASE`` on the server of ``--storage``;
SQLite: a new file), the workers are started together as separate processes, each with ``--threads`` CPU threads,
running the same command (profile with claims, then one shared Optuna study; ``--no-validate``, so that the
figure is the part that several workers share), and the wall time until the last one exits is taken. Also
reported: jobs in the store, how many each worker measured, duplicates (measured in all minus jobs: 0 when no
job was measured twice), complete trials and how many each worker ran. One row per run goes to the CSV.

A PostgreSQL server for a try on one host (as tests/test_postgres.py starts one; as root, run these as the
postgres user): ``initdb -D /tmp/pg -A trust -U circtune``, ``pg_ctl -D /tmp/pg -o "-p 55432 -k /tmp" start``,
then ``--storage postgresql://circtune@127.0.0.1:55432/postgres``.

    python benchmarks/bench_workers.py --storage postgresql://circtune@127.0.0.1:55432/postgres --workers 1 2
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CSV_FIELDS = ("timestamp", "host_cpu", "storage", "model", "workers", "threads_per_worker", "wall_s", "jobs",
              "measured", "duplicates", "trials", "trials_by_worker", "writers")


def fresh_database(storage: str, name: str, folder: Path) -> str:
    """A URL of a new, empty database named ``name``."""
    from sqlalchemy import create_engine, make_url, text

    url = make_url(storage)
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{folder / f'{name}.db'}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as con:
        con.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        con.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def run(args: argparse.Namespace, workers: int, folder: Path) -> dict:
    import optuna

    from circtune.measure.store import MeasurementStore, masked_url

    url = fresh_database(args.storage, f"circtune_bench_w{workers}_{int(time.time())}", folder)
    MeasurementStore(url).close()
    outs = [folder / f"w{workers}-{i}" for i in range(workers)]
    command = ["search", "--model", args.model, "--budget", args.budget, "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--trials", str(args.trials), "--no-validate", "--quiet",
               "--storage", url, "--study-name", "bench"]
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "circtune.cli.main", *command, "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for out in outs]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - started
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{err}")
    jobs = len(MeasurementStore(url).query())
    measured = [json.loads((out / "profile.json").read_text())["measured"] for out in outs]
    study = optuna.load_study(study_name="bench", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_worker = sorted(Counter(t.user_attrs.get("worker") for t in complete).values())
    return {"timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
            "host_cpu": platform.processor() or platform.machine(), "storage": masked_url(url), "model": args.model,
            "workers": workers, "threads_per_worker": args.threads, "wall_s": round(wall, 1), "jobs": jobs,
            "measured": "+".join(map(str, measured)), "duplicates": sum(measured) - jobs, "trials": len(complete),
            "trials_by_worker": "+".join(map(str, by_worker)),
            "writers": sum((out / "adapter_config.json").exists() for out in outs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True, help="a PostgreSQL server URL (a database on it is made per run) "
                                                    "or a SQLite URL (a file per run beside --out)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default: 1 2)")
    p.add_argument("--model", default="roberta-base")
    p.add_argument("--budget", default="50k")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default: 1)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--csv", type=Path, default=Path("reports/bench_workers.csv"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="circtune-bench-workers-") as tmp:
        rows = []
        for n in args.workers:
            rows.append(run(args, n, Path(tmp)))
            print(" ".join(f"{k}={rows[-1][k]}" for k in ("workers", "wall_s", "jobs", "measured", "duplicates",
                                                          "trials", "trials_by_worker", "writers")), flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    base = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        if base and r is not base:
            print(f"{r['workers']} workers: {base['wall_s'] / r['wall_s']:.2f}x the speed of one")


if __name__ == "__main__":
    main()
