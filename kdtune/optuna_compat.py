"""The few things kdtune needs from Optuna that its public API does not offer, in one place.

Each reaches into a private attribute of Optuna 5.0; tests/test_optuna_compat.py pins every one, so an Optuna
release that moves them fails there, by name, rather than somewhere in `status` or the dashboard.
"""

from __future__ import annotations

import optuna

# The logger of Optuna's trial loop (a private module's name): it logs every failed trial.
TRIAL_LOOP_LOGGER_NAME = "optuna.study._optimize"


def stale_trial_numbers(study: optuna.Study) -> set[int]:
    """Running trials whose heartbeat stopped for the storage's grace period (their worker died).

    Optuna exposes them only through `fail_stale_trials()`, which fails them; `status` must only look.
    Storages without heartbeats have none.
    """
    storage = study._storage
    if not hasattr(storage, "_get_stale_trial_ids"):
        return set()
    return {storage.get_trial_number_from_id(trial_id) for trial_id in storage._get_stale_trial_ids(study._study_id)}


def live_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A live `Trial` handle on a trial of `study`, for APIs that take one (optuna-dashboard's `save_note`).
    Building it only reads the trial: kdtune's TPE sampler does nothing before a trial."""
    return optuna.Trial(study, trial._trial_id)
