"""circtune._optuna_compat: a trial's storage id through Optuna's public storage API, and a clear error without it."""

import optuna
import pytest

from circtune._optuna_compat import OptunaCompatError, trial_id


def _study(storage, name):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=name, storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return study


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_trial_id_is_the_id_the_storage_takes(tmp_path, kind):
    if kind == "sqlite":
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    else:
        storage = optuna.storages.InMemoryStorage()
    _study(storage, "first")  # a second study: its trials' ids and numbers then differ
    study = _study(storage, "second")
    for t in study.get_trials(deepcopy=False):
        tid = trial_id(storage, study, t)
        got = storage.get_trial(tid)
        assert (got.number, got.params) == (t.number, t.params)
        assert tid != t.number  # the first study's trials came first: an id is not a number
    # The id is what set_trial_state_values takes: failing a running trial by it marks that trial failed.
    running = study.ask()
    frozen = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))[0]
    assert storage.set_trial_state_values(trial_id(storage, study, frozen), optuna.trial.TrialState.FAIL)
    assert study.get_trials(deepcopy=False)[running.number].state == optuna.trial.TrialState.FAIL


def test_a_storage_without_the_lookups_fails_naming_the_optuna_version():
    class OldStorage:  # as if an Optuna release renamed the look-up
        def get_study_id_from_name(self, name):
            return 0

    study = _study(optuna.storages.InMemoryStorage(), "s")
    with pytest.raises(OptunaCompatError, match=rf"optuna {optuna.__version__}: its storage OldStorage has no usable "
                                                r".*get_trial_id_from_study_id_trial_number"):
        trial_id(OldStorage(), study, study.trials[0])


def test_the_search_fails_and_requeues_a_dead_local_workers_trial_by_its_storage_id(tmp_path):
    """circtune._search._fail_dead_workers, the caller of trial_id: a trial left running by a process of this host
    that is gone is failed at once and enqueued again; a live worker's running trial is left alone."""
    import os
    import socket
    import subprocess
    import sys

    from circtune._search import _fail_dead_workers, study_storage

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    storage = study_storage(f"sqlite:///{tmp_path / 'o.db'}")
    _study(storage, "other")  # trial ids then differ from trial numbers
    study = _study(storage, "s")
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr("worker", f"{socket.gethostname()}:{int(gone.stdout)}")
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert _fail_dead_workers(study, storage) == 1
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING
    assert _fail_dead_workers(study, storage) == 0  # failed once only
