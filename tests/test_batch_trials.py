"""Narrow students' trials trained together: each is still its own trial, with the result it gets alone, its own
pruning, and its own retry when its worker is killed."""

import os
import signal

import optuna
import pytest
from conftest import CPU_FP32, FOREGROUND, signal_handlers
from optuna.trial import TrialState

from kdtune import data, study, target, teacher
from kdtune.spec import load_spec
from kdtune.student import Architecture, StudentConfig, train
from kdtune.transfer import StudentData

ONE_NARROW_BAND = 'bands = "none"\ncontrol_arms = false'  # widths 8 to 64: every trial can batch


@pytest.fixture
def narrow(tiny_spec):
    spec = load_spec(tiny_spec("narrow", student_epochs=4, pruner="none", search=ONE_NARROW_BAND), batch_students=8)
    splits = data.prepare(spec.data, spec.seed)
    return spec, splits, teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)


def trained_alone(spec, splits, cached, trial):
    """The trial's student trained alone, as `tune` trains it with batching off."""
    student_data = StudentData.build(splits, cached.logits["train"], spec.transfer, spec.seed, CPU_FP32.device)
    architecture = Architecture.of(spec.student, student_data.input_shape, student_data.n_classes)
    return train(StudentConfig.from_trial(trial), architecture, spec.student, student_data, spec.seed, CPU_FP32)


def test_trials_trained_together_record_what_each_student_gets_alone(narrow):
    spec, splits, cached = narrow
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 6), n_trials=6, timeout=None,
               progress_bar=False)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert all(t.user_attrs["trained_with"] == list(range(6)) for t in trials)
    assert len({t.params["width"] for t in trials}) > 1, "students of several widths share the batch"
    for trial in trials:
        _, result = trained_alone(spec, splits, cached, trial)
        assert (trial.value, trial.user_attrs["n_epochs"]) == (result.val_accuracy, result.n_epochs)
        assert [trial.intermediate_values[epoch] for epoch in range(result.n_epochs)] == result.val_curve


def test_trials_train_alone_by_default(tiny_spec):
    spec = load_spec(tiny_spec("alone", student_epochs=2, search=ONE_NARROW_BAND))
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 2), n_trials=2, timeout=None,
               progress_bar=False)
    assert not any("trained_with" in t.user_attrs for t in the_study.get_trials())


class PruneTrialTwoAfterItsSecondEpoch(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 2 and max(trial.intermediate_values) == 1


def test_a_pruned_trial_leaves_its_batch_and_the_others_end_as_alone(narrow):
    spec, splits, cached = narrow
    the_study = study.open_study(spec, create=True)
    the_study.pruner = PruneTrialTwoAfterItsSecondEpoch()
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 4), n_trials=4, timeout=None,
               progress_bar=False)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[2].user_attrs["n_epochs"] == 2 and trials[2].value == trials[2].intermediate_values[1]
    assert all(t.user_attrs["trained_with"] == [0, 1, 2, 3] for t in trials)
    for trial in (trials[0], trials[1], trials[3]):
        assert trial.value == trained_alone(spec, splits, cached, trial)[1].val_accuracy


def stop_in_report(number: int, step: int):
    """Ctrl-C as trial `number` reports epoch `step` (0-based)."""
    def install(monkeypatch):
        report = optuna.Trial.report

        def report_and_stop(trial, value, reported_step):
            if (trial.number, reported_step) == (number, step):
                os.kill(os.getpid(), signal.SIGINT)
            report(trial, value, reported_step)

        monkeypatch.setattr(optuna.Trial, "report", report_and_stop)
    return install


def test_a_stop_during_a_batch_ends_its_epoch_then_fails_every_trial_still_training(narrow, monkeypatch):
    """Ctrl-C as trial 1 reports its second epoch: the batch finishes that epoch for every student, then each
    trial ends failed (none RUNNING) with its two epochs recorded."""
    spec, splits, cached = narrow
    the_study = study.open_study(spec, create=True)
    stop_in_report(1, 1)(monkeypatch)
    with signal_handlers(FOREGROUND), pytest.raises(KeyboardInterrupt):
        target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 3), n_trials=3, timeout=None,
                   progress_bar=False)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3, "none stays RUNNING"
    assert [t.user_attrs["n_epochs"] for t in trials] == [2, 2, 2]


def test_the_progress_bar_counts_every_trial_of_a_batch(narrow, capsys):
    spec, splits, cached = narrow
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 5), n_trials=5, timeout=None)
    assert "5/5" in capsys.readouterr().err.splitlines()[-1]


class PruneTrialOneAfterItsFirstEpoch(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 1




def stop_as_trial_1_is_stored(monkeypatch):
    tell = optuna.Study.tell

    def tell_and_stop(the_study, trial, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return tell(the_study, trial, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "tell", tell_and_stop)


def stop_as_trial_1_leaves_the_stack(monkeypatch):
    from kdtune import batched

    keep_students = batched.keep_students

    def keep_and_stop(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return keep_students(*args)

    monkeypatch.setattr(batched, "keep_students", keep_and_stop)


@pytest.mark.parametrize("stop, epochs", [(stop_in_report(0, 2), [3, 1, 3]),
                                          (stop_as_trial_1_is_stored, [1, 1, 1]),
                                          (stop_as_trial_1_leaves_the_stack, [1, 1, 1])])
def test_a_stop_keeps_the_trials_that_left_their_batch_before_it(narrow, monkeypatch, stop, epochs):
    """Trial 1 is pruned after its first epoch and stored at once; a stop, wherever it lands, fails only the
    trials still training, at the end of the epoch it came in: a finished trial is never lost to a stop."""
    spec, splits, cached = narrow
    the_study = study.open_study(spec, create=True)
    the_study.pruner = PruneTrialOneAfterItsFirstEpoch()
    stop(monkeypatch)
    with signal_handlers(FOREGROUND), pytest.raises(KeyboardInterrupt):
        target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 3), n_trials=3, timeout=None,
                   progress_bar=False)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL]
    assert [t.user_attrs["n_epochs"] for t in trials] == epochs


def test_each_band_gets_its_share_when_its_trials_train_together(tiny_spec):
    """Two narrow bands, six trials: three in each, each band's three in one batch."""
    spec = load_spec(tiny_spec("shares", student_epochs=2, pruner="none",
                               search="bands = [25000]\ncontrol_arms = false"), batch_students=8)
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 6), n_trials=6, timeout=None,
               progress_bar=False)
    trials = the_study.get_trials()
    assert [t.user_attrs["band"] for t in trials] == [0, 0, 0, 1, 1, 1]
    assert [t.user_attrs["trained_with"] for t in trials] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3


def test_a_trial_queued_as_a_mate_is_asked_keeps_its_own_band(tiny_spec, monkeypatch):
    """Another worker queues a retry between this one's look at the queue and its ask: the retry comes back as
    a mate, keeps its band and configuration, and no more mates are asked after it."""
    spec = load_spec(tiny_spec("queued", student_epochs=2, pruner="none",
                               search="bands = [25000]\ncontrol_arms = false"), batch_students=8)
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    the_study = study.open_study(spec, create=True)
    has_room = target.has_room
    retried = {"temperature": 2.0, "lambda": 0.5, "width": 50}

    def a_retry_appears(the_study, n_trials):
        if len(the_study.get_trials()) == 1:  # the first trial is asking its mates
            the_study.enqueue_trial(retried, user_attrs={"loss": "hinton", "band": 1})
            return True
        return has_room(the_study, n_trials)

    monkeypatch.setattr(target, "has_room", a_retry_appears)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32, 4), n_trials=4, timeout=None,
               progress_bar=False)
    first, retry = the_study.get_trials()[:2]
    assert (first.user_attrs["band"], retry.user_attrs["band"]) == (0, 1)
    assert retry.params == retried and retry.state == TrialState.COMPLETE
    assert first.user_attrs["trained_with"] == retry.user_attrs["trained_with"] == [0, 1]
