"""A normal run prints no traceback: trials that end in a way kdtune expects are one line or nothing."""

import optuna
import pytest

from kdtune import target
from kdtune.train import FitResult, TrainingDiverged


def run_one(objective):
    the_study = optuna.create_study(direction="maximize")
    target.run(the_study, objective, n_trials=1, timeout=None, progress_bar=False)
    return the_study


def raise_(error):
    def objective(trial):
        trial.suggest_float("x", 0, 1)
        raise error
    return objective


def test_an_expected_failure_is_one_line_without_traceback(trial_log):
    run_one(raise_(TrainingDiverged("the training loss became nan in epoch 1", FitResult(0.0, 0, 0.0))))
    assert len(trial_log) == 1 and "TrainingDiverged('the training loss became nan" in trial_log[0].getMessage()
    assert trial_log[0].exc_info is None


def test_a_surplus_trial_logs_nothing(trial_log):
    def surplus(trial):
        target.surplus(trial, "other workers finished the study while it started")

    assert run_one(surplus).trials[0].state == optuna.trial.TrialState.FAIL
    assert trial_log == []


def test_an_unexpected_error_keeps_its_traceback(trial_log):
    with pytest.raises(ZeroDivisionError):
        run_one(raise_(ZeroDivisionError("a bug")))
    assert any(record.exc_info for record in trial_log)
