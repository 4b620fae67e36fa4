"""A stop signal inside the objective never lands in the middle of a write to the storage: a KeyboardInterrupt
there left the storage's session unusable and the trial RUNNING (`Should not reach.` from Optuna)."""

import os
import signal

import optuna
import pytest
from conftest import CPU_FP32, FOREGROUND, signal_handlers
from optuna.trial import TrialState

from kdtune import data, study, target, teacher
from kdtune.interrupts import uninterrupted
from kdtune.spec import load_spec
from kdtune.storage import open_storage


def test_a_stop_during_a_write_interrupts_right_after_it(tmp_path):
    the_study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"), direction="maximize")

    def objective(trial):
        value = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)  # arrives while the write is under way
                trial.report(0.5, 0)
        return value

    with signal_handlers(FOREGROUND), pytest.raises(KeyboardInterrupt):
        target.run(the_study, objective, n_trials=3, timeout=None, progress_bar=False)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].intermediate_values == {0: 0.5}  # the write was finished, then the stop came


def test_a_stop_during_a_trial_s_report_leaves_a_usable_study(tiny_spec, monkeypatch):
    """The real objective: Ctrl-C arrives inside `trial.report` of the second epoch. The trial ends failed with
    its epochs and its note, and the same storage takes more trials afterwards."""
    spec = load_spec(tiny_spec(student_epochs=3, search="control_arms = false"))
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    the_study = study.open_study(spec, create=True)
    report = optuna.Trial.report

    def report_and_stop(trial, value, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        report(trial, value, step)

    monkeypatch.setattr(optuna.Trial, "report", report_and_stop)
    with signal_handlers(FOREGROUND), pytest.raises(KeyboardInterrupt):
        target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=2, timeout=None,
                   progress_bar=False)
    stopped = the_study.get_trials()[0]
    assert stopped.state == TrialState.FAIL and sorted(stopped.intermediate_values) == [0, 1]
    assert stopped.user_attrs["n_epochs"] == 2
    monkeypatch.setattr(optuna.Trial, "report", report)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=1, timeout=None,
               progress_bar=False)
    assert [t.state for t in the_study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
