import itertools
import json
import random
from collections import Counter

import pandas as pd
import pytest
from tiny_models import tiny_roberta

import circtune
from circtune._search import ranked_assignments, run_study, trials_frame
from circtune.cli.main import main
from circtune.exact import exact_optimum, neighbours, repair, uniform_c3a
from circtune.measure.store import MeasurementStore, this_worker
from circtune.models import TargetLayer, build_model
from circtune.options import BudgetError, parse_budget
from circtune.problem import Option, Problem, build_problem
from circtune.space import Candidate


@pytest.mark.parametrize("text, value", [("100k", 100_000), ("1.5M", 1_500_000), ("250000", 250_000),
                                         ("2K", 2_000), (" 3m ", 3_000_000), ("1e5", 100_000), (42, 42)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5", "0", "1.2345k", "1e999", "100kk", "nan", "inf", "2e20"])
def test_parse_budget_errors(text):
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(text)


def _random_problem(rng: random.Random, n_layers: int, n_options: int, min_fill: float) -> Problem:
    layers = tuple(TargetLayer(f"l{i}", 8, 8) for i in range(n_layers))
    options = []
    for i in range(n_layers):
        opts = {}
        while len(opts) < n_options:
            c = Candidate("c3a", rng.randint(1, 64), None, "rfft", f"b{i}")
            opts[c] = Option(c, rng.choice([3, 6, 9, 12, 15, 30]) * rng.randint(1, 8), rng.uniform(0.1, 10),
                             rng.uniform(0, 5))
        options.append(tuple(sorted(opts.values(), key=lambda o: o.params)))
    sizes = [sum(o.params for o in opts) / len(opts) for opts in options]
    return Problem(layers, tuple(options), int(sum(sizes) * rng.uniform(0.6, 1.3)), min_fill)


def _brute_force(problem: Problem):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in problem.options)):
        params, step, _ = problem.totals(choice)
        if problem.feasible(params) and (best is None or step < best):
            best = step
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_optimum_equals_brute_force(seed):
    rng = random.Random(seed)
    problem = _random_problem(rng, rng.randint(2, 5), rng.randint(2, 5), rng.choice([0.0, 0.5, 0.9]))
    truth = _brute_force(problem)
    if truth is None:
        with pytest.raises(BudgetError):
            exact_optimum(problem)
        return
    best = exact_optimum(problem)
    assert best.step_ms == pytest.approx(truth)
    assert problem.feasible(best.params) and problem.totals(best.choice)[0] == best.params
    for a in neighbours(problem, best):
        assert problem.feasible(a.params) and a.step_ms >= best.step_ms - 1e-9
    fixed = repair(problem, [len(o) - 1 for o in problem.options])
    assert len(fixed) == len(problem.layers)


def _frame(rows):
    cols = ["d_in", "d_out", "tokens", "dtype", "method", "block_size", "factors", "transform", "backend", "params",
            "step_ms", "peak_mem_mb", "status"]
    return pd.DataFrame(rows, columns=cols)


def _table():
    rows = []
    for (d_in, d_out) in [(64, 64), (64, 128)]:
        for p in (8, 16, 32, 64):
            for backend, t in (("torch", "rfft"), ("dense", None)):
                params = d_in * d_out // p
                rows.append([d_in, d_out, 32, "fp32", "c3a", p, None, t, backend, params,
                             1.0 + 64 / p + (0.5 if backend == "dense" else 0.0), params / 1e4, "ok"])
        rows.append([d_in, d_out, 32, "fp32", "cdvft", 16, 2, "rfft", "torch",
                     circtune.cdvft_num_params(d_in, d_out, 16, 2), 3.0, 0.1, "ok"])
        rows.append([d_in, d_out, 32, "fp32", "c3a", 4, None, "rfft", "torch", d_in * d_out // 4, None, None,
                     "out of memory: x"])
    return _frame(rows)


LAYERS = [TargetLayer(f"blocks.{i}.{m}", *shape) for i in range(3) for m, shape in (("a", (64, 64)),
                                                                                      ("b", (64, 128)))]


def test_build_problem_uses_ok_rows_and_states_infeasible_budgets():
    problem = build_problem(LAYERS, _table(), 3000)
    assert all(o.candidate.block_size != 4 for opts in problem.options for o in opts)  # failed row left out
    smallest = 3 * (64 + 128)  # every layer at p=64
    largest = 3 * max(64 * 64 // 8, circtune.cdvft_num_params(64, 64, 16, 2)) + 3 * (64 * 128 // 8)
    with pytest.raises(BudgetError, match=rf"range from {smallest:,} to {largest:,} parameters"):
        build_problem(LAYERS, _table(), 100)
    with pytest.raises(BudgetError, match="cannot be met"):
        build_problem(LAYERS, _table(), 10**7)
    with pytest.raises(ValueError, match="no measured adapter option for shape"):
        build_problem([TargetLayer("x", 32, 32)], _table(), 1000)
    only_dense = build_problem(LAYERS, _table(), 3000, backends=["dense"])
    assert {o.candidate.backend for opts in only_dense.options for o in opts} == {"dense"}


def test_study_picks_stay_in_the_window_and_a_rerun_resumes(tmp_path):
    problem = build_problem(LAYERS, _table(), 3000, 0.9)
    best = exact_optimum(problem)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    seeds = [best, *neighbours(problem, best), *uniform_c3a(problem)]
    study = run_study(problem, storage=storage, study_name="t", n_trials=30, seeds=seeds, progress=False)
    assert len(study.trials) == 30
    trials = trials_frame(problem, study)
    assert trials.source.iloc[0] == "optimum" and trials.step_ms.iloc[0] == pytest.approx(best.step_ms)
    assert trials.pareto.any() and set(trials[trials.pareto].feasible) == {True}
    for objective in ("latency", "memory", "balanced"):
        top = ranked_assignments(problem, study, objective, 3)
        assert top and all(problem.lo <= a.params <= problem.hi for a in top)
    assert ranked_assignments(problem, study, "latency", 1)[0].step_ms == pytest.approx(best.step_ms)
    same = run_study(problem, storage=storage, study_name="t", n_trials=30, seeds=seeds, progress=False)
    assert len(same.trials) == 30  # the study already holds what was asked: nothing more runs
    again = run_study(problem, storage=storage, study_name="t", n_trials=37, seeds=seeds, progress=False)
    assert len(again.trials) == 37  # continued to the new total, not started over
    labels = [t.user_attrs.get("label") for t in again.trials if t.user_attrs.get("source") in ("optimum", "seed")]
    assert sorted(labels) == sorted(a.label for a in seeds)  # every seed exactly once
    assert {t.user_attrs.get("worker") for t in again.trials} == {this_worker()}


TINY_SPACE = ('methods = ["c3a", "cdvft"]\nblock_sizes = [16, 32, 64]\nfactors = [2]\ntransforms = ["rfft"]\n'
              'backends = ["torch", "dense"]\n')


def tiny_search(tmp_path, store: str, trials: int):
    """A maker of `circtune search` commands on a 2-layer tiny RoBERTa (budget 1500, 16 tokens, one thread, no
    whole-model validation) on ``store``: ``command(name, study=name)`` writes to ``tmp_path/name``."""
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=2)
    space = tmp_path / "space.toml"
    space.write_text(TINY_SPACE)

    def command(name, study=None):
        return ["search", "--model", str(folder), "--budget", "1500", "--space", str(space), "--tokens", "16",
                "--threads", "1", "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0",
                "--trials", str(trials), "--no-validate", "--quiet", "--store", store, "--study-name",
                study or name, "--out", str(tmp_path / name)]

    return command


@pytest.mark.slow
def test_search_end_to_end_on_a_tiny_model(tmp_path, capsys):
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=2)
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [16, 32, 64]\ntransforms = ["rfft"]\n'
                     'backends = ["torch", "dense"]\n')
    out = tmp_path / "out"
    args = ["search", "--model", str(folder), "--budget", "900", "--space", str(space), "--batch-size", "2",
            "--seq-len", "8", "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0",
            "--validate-min-time", "0", "--trials", "12", "--top", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    for name in ("adapter_config.json", "measurements.csv", "profile.json", "trials.csv", "validation.csv",
                 "circtune.db", "peft/adapter_config.json"):
        assert (out / name).exists(), name
    meta = json.loads((out / "adapter_config.json").read_text())
    assert 810 <= meta["total_params"] <= 900 and meta["budget"] == 900
    assert meta["predicted_overhead_ms"] >= meta["optimum_overhead_ms"] - 1e-9
    assert meta["tokens"] == 16 and meta["dtype"] == "fp32" and meta["measured_step_ms"] > 0
    model = circtune.apply_adapter(build_model(str(folder), device="cpu"), out / "adapter_config.json")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["total_params"]
    peft = pytest.importorskip("peft")
    assert isinstance(peft.PeftConfig.from_pretrained(str(out / "peft")), peft.C3AConfig)
    validation = pd.read_csv(out / "validation.csv")
    assert validation.picked.sum() == 1 and "no adapter" in set(validation.label)
    assert "predicted #1" in set(validation.label) and set(validation.status) == {"ok"}
    # each baseline row names its baseline (circtune.baselines), the report matches on that, not on the label
    named = validation[validation.kind == "baseline"]
    assert list(named.baseline) == ["none", "lora", "peft-c3a", "uniform-c3a"]
    assert named.label.tolist()[0] == "no adapter" and named.label.tolist()[3].startswith("uniform c3a p=")
    assert validation[validation.kind == "candidate"].baseline.isna().all()
    assert meta["pick_label"] in set(validation.label[validation.picked]) and meta["measured_overhead_ms"] is not None
    # The same command again: the study is complete and its outputs are written, so nothing is redone.
    written = (out / "adapter_config.json").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "is complete and its outputs for these options were written by" in capsys.readouterr().err
    assert (out / "adapter_config.json").read_bytes() == written
    # More trials: the study continues to 24 and the outputs are written again.
    assert main([*args[:-3], "--trials", "24", *args[-3:]]) == 0
    meta2 = json.loads((out / "adapter_config.json").read_text())
    assert meta2["study"]["trials"] == 24


def _dominated(frame: pd.DataFrame) -> bool:
    """Whether some row is beaten on both predicted time (lower) and capacity (higher) by another."""
    return any(((frame.step_ms <= r.step_ms) & (frame.capacity >= r.capacity)
                & ((frame.step_ms < r.step_ms) | (frame.capacity > r.capacity))).any() for r in frame.itertuples())


def test_search_writes_the_front_and_the_allocation(tmp_path, capsys):
    from circtune.pick_files import ALLOCATION_COLUMNS, FRONT_COLUMNS

    command = tiny_search(tmp_path, str(tmp_path / "m.db"), trials=12)
    assert main(command("run")) == 0
    assert "capacity: the pick can express" in capsys.readouterr().err
    out = tmp_path / "run"
    meta = json.loads((out / "adapter_config.json").read_text())
    front, layers = pd.read_csv(out / "front.csv"), pd.read_csv(out / "allocation.csv")
    assert tuple(front.columns) == FRONT_COLUMNS and tuple(layers.columns) == ALLOCATION_COLUMNS
    assert set(front.kind) == {"front", "candidate", "baseline"} and front.picked.sum() == 1
    picked = front[front.picked].iloc[0]
    assert picked.kind == "candidate" and picked.label == "predicted #1"  # --no-validate: the rule's pick
    assert not _dominated(front[front.kind == "front"])
    baselines = front[front.kind == "baseline"]
    assert list(baselines.baseline) == ["lora", "peft-c3a", "uniform-c3a", "latency-only"]
    assert baselines.label.tolist()[1:] == ["PEFT C3A p=16", "uniform c3a p=16", "latency-only optimum"]
    assert baselines.label.tolist()[0].startswith("LoRA r=")
    assert meta["allocation"] == "balanced" and meta["capacity_source"] == "uniform" and meta["calibration"] is None
    assert meta["capacity_tolerance"] == 0.05 and meta["capacity"] == pytest.approx(picked.capacity, rel=1e-5)
    assert meta["capacity"] >= 0.95 * meta["capacity_best"] - 1e-12
    assert meta["capacity_best"] == pytest.approx(front[front.kind == "front"].capacity.max(), rel=1e-5)
    # allocation.csv: the pick layer by layer, inside the balance windows (equal shares without calibration)
    assert len(layers) == 4 and layers.params.sum() == meta["total_params"] == picked.params
    assert (layers.params >= layers.window_lo).all() and (layers.params <= layers.window_hi).all()
    assert layers.share.tolist() == [1500 / 4] * 4 and layers.energy.sum() == pytest.approx(1.0)
    assert layers.capacity.sum() == pytest.approx(meta["capacity"], rel=1e-5)
    assert layers.capacity.tolist() == pytest.approx((layers.energy * layers.fraction).tolist(), rel=1e-5)  # %.6g
    trials = pd.read_csv(out / "trials.csv")
    assert "capacity" in trials and trials.source.iloc[0] == "optimum"
    # No rule and a tolerance that lets every assignment in: the latency-only optimum, as before capacity.
    assert main([*command("free"), "--allocation", "free", "--capacity-tolerance", "0.99"]) == 0
    free = json.loads((tmp_path / "free" / "adapter_config.json").read_text())
    assert free["predicted_overhead_ms"] == pytest.approx(free["optimum_overhead_ms"])
    assert free["allocation"] == "free"


def calibrated_search(tmp_path, *extra: str) -> tuple[list[str], object, object]:
    """A `circtune search` command on the offline calibration folder (tiny RoBERTa MLM whose second layer's
    gradients are the larger) with its texts; returns (command, folder, texts)."""
    from calibration_folder import make_calibration_folder

    folder, texts = make_calibration_folder(tmp_path)
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a", "cdvft"]\nblock_sizes = [8, 16, 32, 64]\nfactors = [2]\ntransforms = ["rfft"]\n'
                     'backends = ["torch"]\n')
    command = ["search", "--model", str(folder), "--space", str(space), "--tokens", "16", "--threads", "1",
               "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0", "--calibration", str(texts),
               "--trials", "12", "--no-validate", "--quiet", "--out", str(tmp_path / "out"), *extra]
    return command, folder, texts


@pytest.mark.slow
def test_calibrated_search_gives_the_layer_with_more_gradient_energy_more_parameters(tmp_path, capsys):
    command, _, texts = calibrated_search(tmp_path, "--targets", "value", "--budget", "800")
    assert main(command) == 0
    assert "calibration gradients" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["capacity_source"] == "calibration" and meta["allocation"] == "balanced"
    assert meta["calibration"]["file"] == str(texts) and meta["calibration"]["texts"] == 12
    assert any("truncated" in note for note in meta["calibration"]["notes"])
    layers = pd.read_csv(tmp_path / "out" / "allocation.csv").sort_values("energy")
    low, high = layers.iloc[0], layers.iloc[-1]
    assert high.energy > 2 * low.energy  # the folder's second layer carries most of the gradient
    assert high.params > low.params and high.capacity > low.capacity
    assert (layers.params >= layers.window_lo).all() and (layers.params <= layers.window_hi).all()
    assert layers.share.sum() == pytest.approx(800)


def test_a_budget_the_balance_rule_cannot_meet_is_refused_before_profiling(tmp_path, capsys):
    # The query layers of the calibration folder's random model get almost no gradient (they take their smallest
    # option) and layer 1's value 92 % of it: at 1,100 parameters its window (504..2,017) and the others' options
    # cannot total 990..1,100 (found by scanning budgets; --allocation free meets it).
    command, _, _ = calibrated_search(tmp_path, "--budget", "1100")
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--allocation balanced" in err and "cannot total 990..1,100 parameters" in err and "meet the rule" in err
    assert "--allocation free" in err and "by gradient energy" in err
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_an_empty_calibration_file_is_refused_before_anything_runs(tmp_path, capsys):
    command, _, texts = calibrated_search(tmp_path, "--budget", "800")
    texts.write_text("\n  \n", encoding="utf-8")
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(texts) in err or texts.name in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget, message", [("lots", "is not a number of parameters"),
                                             ("5", "budget 5 cannot be met")])
def test_search_budget_errors(tmp_path, capsys, budget, message):
    folder = tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [32]\ntransforms = ["rfft"]\nbackends = ["torch"]\n')
    code = main(["search", "--model", str(folder), "--budget", budget, "--space", str(space), "--tokens", "8",
                 "--warmup", "0", "--min-reps", "2", "--max-reps", "2", "--min-time", "0", "--quiet",
                 "--no-validate", "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err


def _search_worker(storage, name, n, queue):
    problem = build_problem(LAYERS, _table(), 3000, 0.9)
    best = exact_optimum(problem)
    seeds = [best, *neighbours(problem, best), *uniform_c3a(problem)]
    study = run_study(problem, storage=storage, study_name="shared", n_trials=n, seeds=seeds, progress=False,
                      seed=int(name[1:]), worker=name)
    queue.put((name, ranked_assignments(problem, study, "latency", 1)[0].choice))


def run_two_search_workers(storage: str, n: int) -> list:
    """Two spawned workers running one study to ``n`` complete trials; returns their picks."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_search_worker, args=(storage, f"w{i}", n, queue)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    return [queue.get(timeout=5)[1] for _ in procs]


def check_shared_study(storage: str, n: int, picks: list) -> None:
    """Both workers ran trials, the counts add up, every seed ran once, and both picks are the single-worker one."""
    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert n <= len(complete) <= n + 1  # a worker mid-trial when the other completes the n-th finishes it
    assert len(complete) == len(study.trials)  # nothing failed, nothing left waiting or running
    by_worker = Counter(t.user_attrs["worker"] for t in complete)
    assert set(by_worker) == {"w0", "w1"} and sum(by_worker.values()) == len(complete)
    problem = build_problem(LAYERS, _table(), 3000, 0.9)
    best = exact_optimum(problem)
    seeds = [best, *neighbours(problem, best), *uniform_c3a(problem)]
    labels = [t.user_attrs["label"] for t in complete if t.user_attrs["source"] in ("optimum", "seed")]
    assert sorted(labels) == sorted(a.label for a in seeds)  # enqueued once although both workers started at once
    assert all(problem.totals(p)[1] == pytest.approx(best.step_ms) for p in picks)  # the single-worker pick


def test_two_workers_never_both_pop_one_enqueued_trial(tmp_path):
    """Optuna marks an enqueued trial running by reading its state "for update", then writing it. Worker A reads;
    worker B pops the same trial before A writes. On SQLite the read must hold the write lock (a plain pysqlite
    SELECT runs outside any transaction), or both workers run the trial (CI: "Cannot tell a COMPLETE trial")."""
    import threading

    import optuna
    from sqlalchemy import event

    from circtune._search import study_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    a, b = study_storage(url), study_storage(url)
    study = optuna.create_study(study_name="s", storage=a)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    b_may_go, b_done = threading.Event(), threading.Event()

    def a_pauses_after_reading(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT") and "trials" in statement and not b_may_go.is_set():
            b_may_go.set()
            b_done.wait(timeout=1.0)  # B either pops the trial now, or waits for A's transaction (the fix)

    event.listen(a.engine, "after_cursor_execute", a_pauses_after_reading)
    popped = {}

    def pop_b():
        b_may_go.wait(timeout=30)
        popped["b"] = b.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
        b_done.set()

    thread = threading.Thread(target=pop_b)
    thread.start()
    popped["a"] = a.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    thread.join(timeout=60)
    assert b_may_go.is_set() and sorted(popped.values()) == [False, True]  # one worker runs it, once
    a.engine.dispose()
    b.engine.dispose()


@pytest.mark.slow
def test_two_search_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    picks = run_two_search_workers(storage, 40)
    check_shared_study(storage, 40, picks)


def _study_trials(store, study: str) -> list[tuple]:
    """(number, state, params as text, values) of every trial of ``study``, read straight from the SQLite file."""
    import sqlite3

    try:
        with sqlite3.connect(store, timeout=30) as con:
            rows = con.execute(
                "select t.number, t.state, t.trial_id from trials t join studies s on s.study_id = t.study_id "
                "where s.study_name = ? order by t.number", (study,)).fetchall()
            out = []
            for number, state, trial_id in rows:
                params = con.execute("select param_name, param_value from trial_params where trial_id = ? "
                                     "order by param_name", (trial_id,)).fetchall()
                values = con.execute("select objective, value from trial_values where trial_id = ? "
                                     "order by objective", (trial_id,)).fetchall()
                out.append((number, state, tuple(params), tuple(values)))
            return out
    except sqlite3.OperationalError:  # not created yet
        return []


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_a_search_stopped_mid_trial_then_rerun_loses_and_duplicates_nothing(tmp_path, signame):
    """Stop a search in the middle of a trial, after some stored ones; the same command again finishes the study,
    keeps every trial it had unchanged, measures nothing again, and picks what an uninterrupted run on the same
    measurements picks. SIGKILL leaves the trial in flight running: the re-run fails it and runs it again from
    its parameters. SIGINT and SIGTERM stop with exit 130 and a one-line summary, and no lock is left behind: a
    signal that comes while Optuna's code runs (here, suggesting) waits for the trial's end, so the trial in flight
    is stored; one that comes in circtune's objective stops the trial, which Optuna records as failed."""
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    import optuna

    store = tmp_path / "m.db"
    command = tiny_search(tmp_path, str(store), trials=80)

    assert main(command("whole")) == 0  # profiles into the store, then the uninterrupted search
    rows = MeasurementStore(store).query()
    proc = subprocess.Popen([sys.executable, "-m", "circtune.cli.main", *command("stopped")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def mid_trial(trials):  # 15 trials stored, and the next one has recorded some of its parameters
        return sum(t[1] == "COMPLETE" for t in trials) >= 15 and any(t[1] == "RUNNING" and t[2] for t in trials)

    deadline = time.time() + 120
    while not mid_trial(_study_trials(store, "stopped")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    kept = [t for t in _study_trials(store, "stopped") if t[1] == "COMPLETE"]
    in_flight = [t for t in _study_trials(store, "stopped") if t[1] in ("RUNNING", "FAIL")]
    assert 15 <= len(kept) < 80 and len(in_flight) <= 1
    assert not (tmp_path / "stopped" / "adapter_config.json").exists()
    if signame != "SIGKILL":
        assert proc.returncode == 130 and "Traceback" not in err
        assert (f"interrupted; kept in the store: {len(kept)} of 80 trials in study stopped; re-running the same "
                "command continues from there") in err.strip().splitlines()[-1]
        assert all(t[1] == "FAIL" for t in in_flight)
        with sqlite3.connect(store) as con:  # the locks on the schema and the seeds were released
            assert con.execute("select count(*) from circtune_claims").fetchone()[0] == 0

    assert main(command("stopped")) == 0
    after = _study_trials(store, "stopped")
    complete = [t for t in after if t[1] == "COMPLETE"]
    assert len(complete) == 80  # the study's total, as uninterrupted
    assert set(kept) <= set(complete)  # every stored trial kept, unchanged
    assert len({t[0] for t in after}) == len(after)
    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{store}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    retried = [t for t in study.trials if "failed_trial" in t.system_attrs]
    if signame != "SIGKILL":  # failed by Optuna as it stopped: lost, not retried
        assert len(failed) == len(in_flight) and not running and not retried
    elif failed:  # the trial in flight, failed by the re-run and run again from its parameters
        assert len(failed) == 1 and not running
        assert len(retried) == 1 and retried[0].system_attrs["failed_trial"] == failed[0].number
        assert retried[0].state == optuna.trial.TrialState.COMPLETE
        # stopped while suggesting: the parameters it had are kept, the rest are sampled on the retry
        assert failed[0].params.items() <= retried[0].params.items()
    else:  # killed between creating the trial and its first line: left to Optuna's heartbeat grace period
        assert len(running) == len(in_flight) and all("worker" not in t.user_attrs for t in running)
    sources = Counter(t.user_attrs.get("label") for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                      and t.user_attrs.get("source") in ("optimum", "seed"))
    assert sources and set(sources.values()) == {1}  # every seed once
    assert len(MeasurementStore(store).query()) == len(rows)  # the profile step measured nothing again
    whole = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    resumed = json.loads((tmp_path / "stopped" / "adapter_config.json").read_text())
    assert resumed["layers"] == whole["layers"]
    assert resumed["total_params"] == whole["total_params"]
    assert len(pd.read_csv(tmp_path / "stopped" / "trials.csv")) == 80
    print(f"search {signame} after {len(kept)} complete trials ({len(in_flight)} in flight); re-run: 80 complete, "
          f"{len(failed)} failed, {len(retried)} retried, {len(running)} left running; {len(rows)} measurements, "
          "none again")


def run_search_workers(store_url: str, tmp_path, n_workers: int = 2, trials: int = 60):
    """``n_workers`` ``circtune search`` processes started together on one store and one study (each profiles
    with claims, then joins the study); returns the command maker and [(out, rc, stderr)]."""
    import subprocess
    import sys

    command = tiny_search(tmp_path, store_url, trials)
    MeasurementStore(store_url).close()  # the tables exist before the workers race
    procs = [subprocess.Popen([sys.executable, "-m", "circtune.cli.main", *command(f"w{i}", "shared")], text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(n_workers)]
    results = []
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        results.append((tmp_path / f"w{i}", p.returncode, err))
    return command, results


def check_search_workers(store_url: str, command, results, trials: int = 60) -> dict:
    """Every job measured once between the workers, the trial counts add up to the study's, the outputs were
    written by exactly one worker, and its pick equals a single worker's on the same measurements."""
    import optuna

    assert all(rc == 0 for _, rc, _ in results), [err for *_, err in results]
    rows = MeasurementStore(store_url).query()
    profiles = [json.loads((out / "profile.json").read_text()) for out, _, _ in results]
    assert sum(p["measured"] for p in profiles) == len(rows)  # no job measured twice, none skipped
    assert all(p["measured"] + p["reused"] == len(rows) for p in profiles)
    study = optuna.load_study(study_name="shared", storage=store_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trials <= len(complete) <= trials + len(results) - 1 and len(complete) == len(study.trials)
    by_worker = Counter(t.user_attrs["worker"] for t in complete)
    assert sum(by_worker.values()) == len(complete)
    labels = Counter(t.user_attrs["label"] for t in complete if t.user_attrs["source"] in ("optimum", "seed"))
    assert labels and set(labels.values()) == {1}  # the seeds were enqueued once
    writers = [out for out, _, _ in results if (out / "adapter_config.json").exists()]
    assert len(writers) == 1  # the outputs were written once
    for out, _, err in results:
        if out not in writers:
            assert "another worker is writing its outputs" in err or "outputs for these options were written" in err
    assert main(command("single", study="single")) == 0  # one worker, the same measurements, a study of its own
    single = json.loads((writers[0].parent / "single" / "adapter_config.json").read_text())
    picked = json.loads((writers[0] / "adapter_config.json").read_text())
    assert picked["layers"] == single["layers"] and picked["total_params"] == single["total_params"]
    assert len(MeasurementStore(store_url).query()) == len(rows)
    return {"jobs": len(rows), "measured": [p["measured"] for p in profiles], "trials": len(complete),
            "by_worker": sorted(by_worker.values())}


@pytest.mark.slow
def test_two_search_commands_share_one_sqlite_store_and_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    command, results = run_search_workers(url, tmp_path)
    print("two search workers on SQLite:", check_search_workers(url, command, results))
