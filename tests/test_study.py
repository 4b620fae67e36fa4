"""The study: parameters, pruning, records, resume rules; trials never see the test set."""

import dataclasses
import os
import signal
import sqlite3
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from conftest import CPU_FP32, FOREGROUND, signal_handlers
from optuna.trial import TrialState

from kdtune import bands, data, health, study, study_setup, target, teacher
from kdtune.spec import SpecError, load_spec
from kdtune.student import Architecture, StudentConfig


@pytest.fixture
def setup(tiny_spec):
    spec = load_spec(tiny_spec())
    splits = data.prepare(spec.data, spec.seed)
    return spec, splits, teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)


def test_trials_carry_the_three_params_curves_and_records(setup):
    spec, splits, cached = setup
    the_study = study.open_study(spec, create=True)
    study.record(the_study, spec, splits, cached, CPU_FP32)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=2, timeout=None)
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


@pytest.mark.parametrize("loss", ["hinton", "dist", "dkd", "lskd", "mse"])
def test_each_searched_loss_form_samples_its_own_params_from_its_own_ranges(loss):
    search = load_spec().search
    band = bands.Band(0, 16, 64, 1_000, 100_000)
    the_study = optuna.create_study(direction="maximize")
    the_study.enqueue_trial({"loss": loss})
    trial = the_study.ask()
    config = study.suggest(trial, search, ["hinton", "dist", "dkd", "lskd", "mse"], band)
    trial.set_user_attr("loss", config.loss)
    the_study.tell(trial, 0.5)
    frozen = the_study.trials[0]
    expected = {"hinton": {"temperature", "lambda"}, "dist": {"dist_temperature", "dist_lambda"},
                "dkd": {"dkd_temperature", "dkd_lambda", "dkd_alpha", "dkd_beta"},
                "lskd": {"lskd_temperature", "lskd_lambda"}, "mse": {"mse_lambda"}}[loss]
    assert set(frozen.params) == expected | {"loss", "width"}
    assert config.loss == loss and config.within(search)
    if loss != "hinton":  # log-scaled, from the form's own table
        assert frozen.distributions[f"{loss}_lambda"].log
        assert frozen.distributions[f"{loss}_lambda"].low == getattr(search, loss).label_weight.low
    assert StudentConfig.from_trial(frozen) == config, "the report rebuilds each trial's student from its record"


def test_a_study_searching_the_loss_form_trains_and_records_every_form(tiny_spec, setup):
    _, splits, cached = setup
    path = tiny_spec("forms")
    path.write_text(path.read_text().replace("[student]\n", '[student]\nloss = ["hinton", "dkd", "mse"]\n'))
    spec = load_spec(path)
    the_study = study.open_study(spec, create=True)
    study_setup.set_up(the_study, spec, splits, CPU_FP32, echo=lambda _: None)  # queues the control arms
    arms = the_study.get_trials(states=(TrialState.WAITING,))
    assert {t.user_attrs["loss"] for t in arms} == {"hinton"}, "trained alone, every form is hinton's"
    wide = bands.band_of_width(bands.recorded(the_study), 49)  # wide enough to learn in 3 epochs of the tiny data
    for loss in ("dkd", "mse"):
        the_study.enqueue_trial({"loss": loss, f"{loss}_lambda": 0.5, "width": 49},
                                user_attrs={bands.TRIAL_KEY: wide.index})
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=len(arms) + 2, timeout=None)
    finished = the_study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert sorted(t.user_attrs["loss"] for t in finished) == sorted(["hinton"] * len(arms) + ["dkd", "mse"])
    for trial in finished:
        assert StudentConfig.from_trial(trial).loss == trial.user_attrs["loss"]


def test_fixed_params_stay_fixed(tiny_spec, setup):
    _, splits, cached = setup
    spec = load_spec(tiny_spec("fixed", width="24", search="temperature = 4.0"))
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=2, timeout=None)
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


# One change per recorded section, each of which changes what a trial's value means.
SECTION_CHANGES = {
    "seed": lambda spec: dataclasses.replace(spec, seed=spec.seed + 1),
    "precision": lambda spec: dataclasses.replace(spec, precision="bf16"),
    "data": lambda spec: dataclasses.replace(spec, data=dataclasses.replace(spec.data, val_fraction=0.2)),
    "teacher": lambda spec: dataclasses.replace(spec, teacher=dataclasses.replace(spec.teacher, max_epochs=3)),
    "student": lambda spec: dataclasses.replace(spec, student=dataclasses.replace(spec.student, patience_epochs=2)),
    "search": lambda spec: dataclasses.replace(spec, search=dataclasses.replace(spec.search, pruner="none")),
    "transfer": lambda spec: dataclasses.replace(spec, transfer=dataclasses.replace(spec.transfer, labelled=0.5)),
}
# What `record` reads of the teacher; resume checks need no trained one.
STUB_TEACHER = teacher.CachedTeacher("stub", Path("."), {}, {"val_accuracy": 0.5, "n_parameters": 3_362_570})


@pytest.fixture
def recorded(tiny_spec):
    """A new study with its record written, as `tune` leaves it."""
    spec = load_spec(tiny_spec())
    the_study = study.open_study(spec, create=True)
    study.record(the_study, spec, data.prepare(spec.data, spec.seed), STUB_TEACHER, CPU_FP32)
    return spec


def test_every_recorded_section_has_a_change_to_resume_with():
    assert set(SECTION_CHANGES) == set(study.RECORDED_SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTION_CHANGES))
def test_resume_with_a_changed_recorded_section_is_refused(recorded, section):
    spec = recorded
    study.open_study(spec, create=True)  # the same spec resumes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 where it is emulated says so
        changed = SECTION_CHANGES[section](spec)
        with pytest.raises(SpecError, match=rf"different \[?{section}\b"):
            study.open_study(changed, create=True)


def test_resume_with_changed_workers_or_report_settings_is_accepted(recorded):
    """`tune --jobs` and `report --seeds` change these on a recorded study: they do not change what trials mean."""
    spec = recorded
    changed = dataclasses.replace(spec, workers=dataclasses.replace(spec.workers, max_retries=3),
                                  report=dataclasses.replace(spec.report, n_seeds=3))
    assert study.open_study(changed, create=False).study_name == spec.name


def test_trials_never_touch_the_test_set(setup):
    """Poison the test images, labels and the teacher's test logits: any read of them while the objective is
    built or a trial runs fails loudly instead of leaking test information into the search."""
    spec, splits, cached = setup
    poisoned = dataclasses.replace(splits, x_test=PoisonTensor(), y_test=PoisonTensor())
    poisoned_teacher = dataclasses.replace(cached, logits={**cached.logits, "test": PoisonTensor()})
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, poisoned, poisoned_teacher, CPU_FP32), n_trials=1, timeout=None,
              progress_bar=False)
    assert the_study.trials[0].state == optuna.trial.TrialState.COMPLETE


class PoisonTensor:
    """Stands in for a test tensor: attribute access, indexing, len, iteration and torch functions all fail."""

    def __getattr__(self, name):
        raise AssertionError(f"a trial read the test set ({name})")

    def __getitem__(self, index):
        raise AssertionError("a trial indexed the test set")

    def __len__(self):
        raise AssertionError("a trial took the length of the test set")

    def __iter__(self):
        raise AssertionError("a trial iterated over the test set")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"a trial passed the test set to {func}")


def test_nan_loss_fails_the_trial_not_the_study(setup, tiny_spec):
    spec, splits, cached = setup
    nan_logits = dataclasses.replace(cached, logits={**cached.logits, "train": torch.full_like(
        cached.logits["train"], float("nan"))})
    spec = load_spec(tiny_spec("nan", search="lambda = 0.5"))
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, nan_logits, CPU_FP32), n_trials=2, timeout=None)
    assert [t.state for t in the_study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("loss became nan" in t.user_attrs["fail_reason"] for t in the_study.trials)


def test_a_new_study_runs_the_control_arms_first(setup, tiny_spec):
    _, splits, cached = setup
    spec = load_spec(tiny_spec("controls", width="[16, 1024]", student_epochs=1))
    the_study = study.open_study(spec, create=True)
    study_setup.set_up(the_study, spec, splits, CPU_FP32, echo=lambda _: None)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=6, timeout=None)
    controls = [(t.user_attrs.get("control"), t.params["lambda"], t.params["width"], t.user_attrs["loss"],
                 t.user_attrs["band"]) for t in the_study.trials[:5]]
    # bands of 16-37, 38-125, 126-377 and 378-1024 hidden units on 28x28 images: each band's middle width
    assert controls == [("reference", 0.5, 512, "reference", 3)] + [
        ("no_distillation", 1.0, width, "hinton", band) for width, band in ((24, 0), (69, 1), (218, 2), (622, 3))]
    assert the_study.trials[0].params["temperature"] == 10.0
    assert the_study.trials[5].user_attrs.get("control") is None
    # queueing again, as a set-up taken over from a creator that died does, adds none
    study.enqueue_control_arms(the_study, spec.search, spec.student.loss, bands.recorded(the_study))
    assert not the_study.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_a_resumed_study_draws_new_proposals(tiny_spec):
    """The sampler is seeded by the spec; a resumed study must not replay the configurations it began with.
    Control arms off: they are queued only on a new study, and would hide what the sampler proposes."""
    spec = load_spec(tiny_spec("resumed", search="control_arms = false"))

    size_bands = bands.size_bands(spec.search, Architecture("mlp", 1, (1, 28, 28), 10), 3_362_570)

    def objective(trial):
        config = study.suggest(trial, spec.search, spec.student.loss, study.assign_band(trial, size_bands))
        return config.temperature * (1 - config.label_weight)

    first = study.open_study(spec, create=True)
    study.record(first, spec, data.prepare(spec.data, spec.seed), STUB_TEACHER, CPU_FP32)  # as `tune` does
    target.run(first, objective, n_trials=3, timeout=None, progress_bar=False)
    resumed = study.open_study(spec, create=True)
    target.run(resumed, objective, n_trials=6, timeout=None, progress_bar=False)
    params = [tuple(sorted(t.params.items())) for t in resumed.trials]
    assert len(params) == 6
    assert not set(params[:3]) & set(params[3:])


def test_controls_outside_the_search_space_are_left_out(tiny_spec):
    spec = load_spec(tiny_spec("narrow", width="[16, 64]", search="lambda = [0.0, 0.9]"))
    size_bands = bands.size_bands(spec.search, Architecture("mlp", 1, (1, 28, 28), 10), None)
    assert study.control_arms(spec.search, spec.student.loss, size_bands) == []


def test_completed_trials_record_distillation_health(setup):
    spec, splits, cached = setup
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, splits, cached, CPU_FP32), n_trials=1, timeout=None)
    attrs = the_study.trials[0].user_attrs
    assert 0.0 <= attrs["teacher_agreement"] <= 1.0 and attrs["kl_at_temperature"] >= 0.0
    assert 0.0 <= attrs["calibration_error"] <= 1.0


def test_a_student_stuck_at_chance_fails_with_its_reason(setup):
    spec, splits, cached = setup
    unlearnable = dataclasses.replace(splits, y_val=torch.full_like(splits.y_val, -1))  # no prediction is right
    the_study = study.open_study(spec, create=True)
    target.run(the_study, study.make_objective(spec, unlearnable, cached, CPU_FP32), n_trials=1, timeout=None)
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
    with signal_handlers(FOREGROUND):
        with pytest.raises(KeyboardInterrupt):
            target.run(the_study, lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, timeout=None,
                      progress_bar=False)
        assert {n: signal.getsignal(n) for n in FOREGROUND} == FOREGROUND  # the handlers are given back
    states = [t.state for t in the_study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]


def test_a_background_run_keeps_ignoring_ctrl_c():
    """A shell starts background jobs with SIGINT ignored, so that a Ctrl-C meant for the foreground job
    does not stop them: the study must not take it."""
    the_study = optuna.create_study(direction="maximize",
                                    sampler=SignalWhileCreatingTrial(signal.SIGINT, on_trial=2))
    with signal_handlers({signal.SIGINT: signal.SIG_IGN}):
        try:
            target.run(the_study, lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, timeout=None,
                      progress_bar=False)
        except KeyboardInterrupt:  # not left to pytest, which would take it as the user's and end the session
            pytest.fail("a Ctrl-C the shell told the study to ignore stopped it")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert [t.state for t in the_study.get_trials()] == [TrialState.COMPLETE] * 5


def no_distillation_control(value: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"temperature": 1.0, "lambda": 1.0, "width": 64}, value=value,
        distributions={"temperature": optuna.distributions.FloatDistribution(1.0, 20.0),
                       "lambda": optuna.distributions.FloatDistribution(0.0, 1.0),
                       "width": optuna.distributions.IntDistribution(8, 64)},
        user_attrs={"control": "no_distillation", "loss": "hinton"})


@pytest.mark.parametrize("control_value, warned", [(0.91, True), (0.89, False)])
def test_tune_warns_once_when_the_student_alone_beats_the_teacher(control_value, warned, capsys):
    the_study = optuna.create_study(direction="maximize")
    the_study.set_user_attr("teacher_val_accuracy", 0.90)
    warn = health.TeacherBehindWarning()
    for _ in range(2):
        the_study.add_trial(no_distillation_control(control_value))
        warn(the_study, the_study.trials[-1])
    err = capsys.readouterr().err
    assert err.count("distilling from this teacher cannot be expected to help") == (1 if warned else 0)
    if warned:
        assert "reaches 0.9100 validation accuracy, above the teacher's 0.9000" in err


def test_a_study_of_one_other_loss_form_still_runs_its_no_distillation_arms_as_hintons():
    """lambda = 1 lies outside DIST's (log-scaled) range: the twin is the same student under Hinton's loss."""
    size_bands = [bands.Band(0, 16, 64, 12_730, 50_890)]
    arms = study.control_arms(load_spec().search, "dist", size_bands, reference=False)
    assert arms and {(config.loss, config.label_weight, control) for config, control in arms} == {
        ("hinton", 1.0, "no_distillation")}
