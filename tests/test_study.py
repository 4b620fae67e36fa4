"""The study: parameters, pruning, records, resume rules; trials never see the test set."""

import dataclasses

import optuna
import pytest
import torch

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
