"""The one place circtune reaches past Optuna's study API into its storage's trial ids.

Storage methods (``set_trial_state_values``, ``get_trial``) take a trial's storage id, which ``FrozenTrial`` holds
only in a private attribute. :func:`trial_id` gets it through the storage's public look-ups instead, and names
the installed Optuna version when those look-ups are missing, so that an Optuna release that changes them fails
with one clear line rather than an ``AttributeError`` deep inside the search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.study import Study
    from optuna.trial import FrozenTrial


class OptunaCompatError(RuntimeError):
    """The installed Optuna lacks a storage method circtune relies on."""


def _optuna_version() -> str:
    import optuna

    return optuna.__version__


def trial_id(storage: BaseStorage, study: Study, trial: FrozenTrial) -> int:
    """The storage's id of ``trial`` (one of ``study``'s trials), for storage methods that take a trial id.

    Found by the study's name and the trial's number through ``BaseStorage.get_study_id_from_name`` and
    ``BaseStorage.get_trial_id_from_study_id_trial_number`` (two small queries: this is for the few trials a
    search repairs, not for every trial)."""
    try:
        study_id = storage.get_study_id_from_name(study.study_name)
        return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    except (AttributeError, TypeError, NotImplementedError) as e:
        raise OptunaCompatError(
            f"optuna {_optuna_version()}: its storage {type(storage).__name__} has no usable "
            f"get_study_id_from_name/get_trial_id_from_study_id_trial_number ({type(e).__name__}: {e}); circtune "
            "needs them (part of BaseStorage in optuna >= 4.0) to fail a dead worker's trial") from e
