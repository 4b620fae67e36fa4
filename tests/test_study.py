"""The study: parameters, pruning, records, resume rules; trials never see the test set."""

import dataclasses
import os
import signal
import sqlite3

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdtune import data, study, teacher
from kdtune.spec import SpecError, load_spec


@pytest.fixture
def setup(tiny_spec):
    spec = load_spec(tiny_spec())
    splits = data.prepare(spec.data, spec.seed)
    return spec, splits, teacher.load_or_train(spec, splits, echo=lambda _: None)


def test_trials_carry_the_three_params_curves_and_records(setup):
    spec, splits, cached = setup
    the_study = study.open_study(spec, create=True)
    study.record(the_study, spec, splits, cached)
    study.run(the_study, study.make_objective(spec, splits, cached), n_trials=2, timeout=None)
    trials = the_study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    for trial in trials:
        assert set(trial.params) == {"temperature", "lambda", "width"}
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        assert trial.value == max(trial.intermediate_values.values())
        assert {"n_parameters", "n_epochs", "seconds"} <= set(trial.user_attrs)
    attrs = the_study.user_attrs
    assert attrs["teacher_cache_id"] == cached.cache_id and attrs["data_fingerprint"] == splits.fingerprint
    assert attrs["spec"]["search"]["lambda"] == [0.0, 1.0] and "optuna" in attrs["versions"]


def test_fixed_params_stay_fixed(tiny_spec, setup):
    _, splits, cached = setup
    spec = load_spec(tiny_spec("fixed", width="24", search="temperature = 4.0"))
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, splits, cached), n_trials=2, timeout=None)
    assert {(t.params["temperature"], t.params["width"]) for t in the_study.trials} == {(4.0, 24)}


def test_median_pruner_stops_a_trial_below_the_median(tiny_spec):
    """Driven with ask/tell as Optuna's own pruner tests are: the pruner kdtune builds does prune."""
    spec = load_spec(tiny_spec(n_startup_trials=1))
    the_study = optuna.create_study(direction="maximize", pruner=study.make_pruner(spec))
    good = the_study.ask()
    for epoch in range(3):
        good.report(0.9, epoch)
    the_study.tell(good, 0.9)
    weak = the_study.ask()
    weak.report(0.2, 0)
    assert weak.should_prune()


def test_resume_with_a_changed_search_is_refused(setup):
    spec, splits, cached = setup
    the_study = study.open_study(spec, create=True)
    study.record(the_study, spec, splits, cached)
    changed = dataclasses.replace(spec, search=dataclasses.replace(spec.search, pruner="none"))
    with pytest.raises(SpecError, match=r"different \[search\] section"):
        study.open_study(changed, create=True)


def test_trials_never_touch_the_test_set(setup):
    """Poison the test tensors: any read of them inside a trial would fail or change nothing silently."""
    spec, splits, cached = setup
    poisoned = dataclasses.replace(splits, x_test=PoisonTensor(), y_test=PoisonTensor())
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, poisoned, cached), n_trials=1, timeout=None)
    assert the_study.trials[0].state == optuna.trial.TrialState.COMPLETE


class PoisonTensor:
    def __getattr__(self, name):
        raise AssertionError(f"a trial read the test set ({name})")


def test_nan_loss_fails_the_trial_not_the_study(setup, tiny_spec):
    spec, splits, cached = setup
    nan_logits = dataclasses.replace(cached, logits={**cached.logits, "train": torch.full_like(
        cached.logits["train"], float("nan"))})
    spec = load_spec(tiny_spec("nan", search="lambda = 0.5"))
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, splits, nan_logits), n_trials=2, timeout=None)
    assert [t.state for t in the_study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("loss became nan" in t.user_attrs["fail_reason"] for t in the_study.trials)


def test_a_new_study_runs_the_control_arms_first(setup, tiny_spec):
    _, splits, cached = setup
    spec = load_spec(tiny_spec("controls", width="[16, 1024]"))
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, splits, cached), n_trials=5, timeout=None)
    controls = [(t.user_attrs.get("control"), t.params["lambda"], t.params["width"], t.user_attrs["loss"])
                for t in the_study.trials[:4]]
    assert controls == [("reference", 0.5, 512, "reference"), ("no_distillation", 1.0, 16, "hinton"),
                        ("no_distillation", 1.0, 128, "hinton"), ("no_distillation", 1.0, 1024, "hinton")]
    assert the_study.trials[0].params["temperature"] == 10.0
    assert the_study.trials[4].user_attrs.get("control") is None
    again = study.open_study(spec, create=True)  # resuming enqueues nothing more
    assert not again.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_controls_outside_the_search_space_are_left_out(tiny_spec):
    spec = load_spec(tiny_spec("narrow", width="[16, 64]", search="lambda = [0.0, 0.9]"))
    assert study.control_arms(spec.search) == []


def test_completed_trials_record_distillation_health(setup):
    spec, splits, cached = setup
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, splits, cached), n_trials=1, timeout=None)
    attrs = the_study.trials[0].user_attrs
    assert 0.0 <= attrs["teacher_agreement"] <= 1.0 and attrs["kl_at_temperature"] >= 0.0
    assert 0.0 <= attrs["calibration_error"] <= 1.0


def test_a_student_stuck_at_chance_fails_with_its_reason(setup):
    spec, splits, cached = setup
    unlearnable = dataclasses.replace(splits, y_val=torch.full_like(splits.y_val, -1))  # no prediction is right
    the_study = study.open_study(spec, create=True)
    study.run(the_study, study.make_objective(spec, unlearnable, cached), n_trials=1, timeout=None)
    trial = the_study.trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "stayed at chance" in trial.user_attrs["fail_reason"]


def test_the_study_database_is_readable_while_a_trial_writes(tiny_spec):
    """WAL mode: the dashboard and `best` can read a study that a running `tune` is writing."""
    spec = load_spec(tiny_spec())
    study.open_study(spec, create=True)
    database = spec.storage_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class SignalWhileCreatingTrial(optuna.samplers.RandomSampler):
    """Sends the signal from inside `study.ask()`, after the trial exists and before the objective runs:
    the window in which a plain KeyboardInterrupt leaves the trial RUNNING."""

    def __init__(self, signum: int, on_trial: int) -> None:
        super().__init__(seed=0)
        self.signum, self.on_trial = signum, on_trial

    def before_trial(self, the_study, trial) -> None:
        if trial.number == self.on_trial:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_while_a_trial_is_created_leaves_none_running(signum):
    the_study = optuna.create_study(direction="maximize", sampler=SignalWhileCreatingTrial(signum, on_trial=2))
    with pytest.raises(KeyboardInterrupt):
        study.run(the_study, lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, timeout=None,
                  progress_bar=False)
    states = [t.state for t in the_study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
