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


def give_first_heartbeats(study: optuna.Study) -> None:
    """Give each running trial that has no heartbeat yet one, stamped now by the database.

    Optuna never calls a running trial without a heartbeat stale, and its worker records the first beat only
    after creating the trial: a worker that dies in between (the database went away at that instant) leaves a
    trial RUNNING for good, and `target.wait_for_a_place` then waits for it forever. With one beat, a live
    worker's own beats keep the trial fresh; a dead worker's goes stale after the grace period, and
    `fail_stale_trials` fails it and queues its retry. Storages without heartbeats have nothing to do.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    storage = getattr(study._storage, "_backend", study._storage)  # RDBStorage comes wrapped in a cache
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.get_heartbeat_interval() is None:
        return
    with _create_scoped_session(storage.scoped_session, True) as session:  # True: the worker's own first beat won
        silent = (session.query(models.TrialModel.trial_id)
                  .filter(models.TrialModel.study_id == study._study_id,
                          models.TrialModel.state == optuna.trial.TrialState.RUNNING,
                          ~models.TrialModel.heartbeats.any()).all())
        for (trial_id,) in silent:
            session.add(models.TrialHeartbeatModel(trial_id=trial_id))


def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """A context manager that beats for `trial` while it runs, as Optuna's trial loop does for the trial it
    runs: for trials asked beside it (kdtune's batch mates), so that a killed worker's trials all go stale and
    are retried. Nothing on storages without heartbeats."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def live_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A live `Trial` handle on a trial of `study`, for APIs that take one (optuna-dashboard's `save_note`).
    Building it only reads the trial: kdtune's TPE sampler does nothing before a trial."""
    return optuna.Trial(study, trial._trial_id)


class TrialSubset:
    """A study as seen through a filter on its trials, for a sampler or pruner that should judge a trial among
    some trials only (kdtune.per_band: those of its size band). Optuna's own HyperbandPruner does the same for
    its brackets with a private `_BracketStudy`. Samplers read trials through the private `Study._get_trials`
    (TPESampler does), so both getters are filtered. Only what TPE and the median and successive-halving
    pruners read besides trials is passed through, explicitly: anything else (`best_trial`, say) would see the
    whole study, so it is missing here rather than silently unfiltered."""

    def __init__(self, study: optuna.Study, keep) -> None:
        self._study, self._keep = study, keep

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if self._keep(t)]

    def _get_trials(self, deepcopy: bool = True, states=None,
                    use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if self._keep(t)]

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials()

    @property
    def direction(self):
        return self._study.direction

    @property
    def directions(self):
        return self._study.directions

    def _is_multi_objective(self) -> bool:
        return self._study._is_multi_objective()

    @property
    def _study_id(self) -> int:
        return self._study._study_id  # a search-space cache's key

    @property
    def _storage(self):
        return self._study._storage  # successive halving records each trial's rung value through it
