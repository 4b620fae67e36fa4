"""The Optuna study: storage, sampler, pruner, the objective, and the record a study keeps of itself.

Trials train a student on the cached teacher logits only (the teacher never runs inside a trial) and see
the train and validation tensors only: the test set is not passed in.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm import tqdm

from kdtune import dashboard, health
from kdtune.data import Splits
from kdtune.errors import STORAGE_ERRORS
from kdtune.hardware import resolve_compute
from kdtune.interrupts import StopRequest
from kdtune.losses import LOSSES
from kdtune.models import StudentMLP, student_n_parameters
from kdtune.optuna_compat import stale_trial_numbers
from kdtune.provenance import versions
from kdtune.spec import TRANSPOSED_FORMATS, Range, SearchSpec, Spec, SpecError, StudentSpec, to_toml_dict
from kdtune.storage import open_storage, sqlite_holds_studies, sqlite_path
from kdtune.teacher import CachedTeacher
from kdtune.train import FitResult, TrainingDiverged, fit, predict
from kdtune.transfer import StudentData
from kdtune.trial_log import quiet_trial_log

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial that ends this way is recorded as failed, with its reason, and the study goes on.
class SurplusTrial(Exception):
    """Workers sharing a study started more trials than it needed; this one never trains."""


TRIAL_FAILURES = (TrainingDiverged, health.StuckAtChance, SurplusTrial)
# How often a trial waiting for a place looks again. Every second costs one small query per waiting worker;
# polling at the heartbeat interval (10 s) kept `tune --jobs 2` idle for up to 10 s as the study ended.
PLACE_POLL_SECONDS = 1.0
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
WORKER_SEED_STRIDE = 1_000_003  # a prime far above any trial count
# Spec sections that decide what a trial's value means: resuming with any of them changed would mix
# incomparable trials in one study.
RECORDED_SECTIONS = ("seed", "precision", "data", "teacher", "student", "search", "transfer")
# study user attribute: the process setting a new study up, {"worker": host:pid, "beat": n}; None once it stopped
SET_UP_BY_KEY = "set_up_by"
# study user attribute: how the record reads; absent in studies recorded before it existed
RECORD_VERSION_KEY, RECORD_VERSION = "record_version", 2


@dataclass(frozen=True)
class StudentConfig:
    temperature: float
    label_weight: float  # Optuna param "lambda"
    width: int
    loss: str = "hinton"

    def as_params(self) -> dict:
        """The user-facing names, as in the study and the spec."""
        return {"temperature": self.temperature, "lambda": self.label_weight, "width": self.width, "loss": self.loss}

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial) -> StudentConfig:
        params = trial.params
        return cls(params["temperature"], params["lambda"], params["width"], trial.user_attrs["loss"])


def suggest(trial: optuna.Trial, search: SearchSpec, loss: str) -> StudentConfig:
    def suggest_float(name: str, r: Range, log: bool) -> float:
        return trial.suggest_float(name, r.low, r.high, log=log and not r.fixed)

    return StudentConfig(
        temperature=suggest_float("temperature", search.temperature, log=True),
        label_weight=suggest_float("lambda", search.label_weight, log=False),
        width=trial.suggest_int("width", int(search.width.low), int(search.width.high), log=not search.width.fixed),
        loss=loss)


def train_student(config: StudentConfig, schedule: StudentSpec, data: StudentData, seed: int,
                  report: Callable[[int, float], None] | None = None,
                  autocast_dtype: torch.dtype | None = None) -> tuple[StudentMLP, FitResult]:
    """One student on tensors already on the device; without distillation, on the labelled images only."""
    if config.label_weight == 1.0:
        data = data.labelled_only()
    torch.manual_seed(seed)
    model = StudentMLP(data.image_shape, data.n_classes, config.width)
    loss_fn = functools.partial(LOSSES[config.loss], temperature=config.temperature, label_weight=config.label_weight)
    result = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, loss_fn=loss_fn, schedule=schedule,
                 seed=seed, teacher_logits=data.teacher_logits, report=report, autocast_dtype=autocast_dtype)
    return model, result


def control_arms(search: SearchSpec) -> list[tuple[dict, dict]]:
    """(params, user_attrs) of the trials every study runs first: the seed project's configuration, and the
    student without distillation (lambda = 1) at the smallest, middle and largest width. Arms outside the
    search ranges are left out."""
    width = search.width
    widths = sorted({int(width.low), round((width.low * width.high) ** 0.5), int(width.high)})
    arms = [({"temperature": 10.0, "lambda": 0.5, "width": 512}, {"control": "reference", "loss": "reference"})]
    arms += [({"temperature": search.temperature.low, "lambda": 1.0, "width": w}, {"control": "no_distillation"})
             for w in widths]
    ranges = {"temperature": search.temperature, "lambda": search.label_weight, "width": width}
    return [(params, attrs) for params, attrs in arms
            if all(ranges[k].low <= v <= ranges[k].high for k, v in params.items())]


def enqueue_control_arms(study: optuna.Study, search: SearchSpec) -> None:
    """Queue the control arms ahead of the sampler, unless the spec turns them off. Arms are queued in order,
    so a set-up interrupted part-way leaves the first few: only the rest are queued."""
    if search.control_arms:
        n_queued = sum("control" in t.user_attrs for t in study.get_trials(deepcopy=False))
        for params, attrs in control_arms(search)[n_queued:]:
            study.enqueue_trial(params, user_attrs=attrs)


def make_objective(spec: Spec, splits: Splits, teacher: CachedTeacher) -> Callable[[optuna.Trial], float]:
    compute = resolve_compute(spec.device, spec.precision)
    trial_data = StudentData.build(splits, teacher.logits["train"], spec.transfer, spec.seed, compute.device)
    teacher_val_logits = teacher.logits["val"].to(compute.device)

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, spec.search, trial.user_attrs.get("loss", spec.student.loss))
        trial.set_user_attr("loss", config.loss)
        trial.set_user_attr("worker", WORKER_ID)  # `status` shows where a running trial runs
        n_parameters = student_n_parameters(trial_data.image_shape, trial_data.n_classes, config.width)
        trial.set_user_attr("n_parameters", n_parameters)
        val_curve, started, outcome = [], time.perf_counter(), "interrupted"

        def report(epoch: int, val_accuracy: float) -> None:
            val_curve.append(val_accuracy)
            trial.report(val_accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at val_accuracy={val_accuracy:.4f}")

        try:
            model, result = train_student(config, spec.student, trial_data, spec.seed, report,
                                          compute.autocast_dtype)
            health.check_learnt(result.val_accuracy, trial_data.n_classes)
            outcome = f"complete, best validation accuracy {100 * result.val_accuracy:.2f}%"
        except optuna.TrialPruned as pruned:
            outcome = str(pruned)
            raise
        except TRIAL_FAILURES as failure:
            trial.set_user_attr("fail_reason", str(failure))
            outcome = f"failed: {failure}"
            raise
        finally:  # pruned and failed trials keep their cost and their note too
            seconds = time.perf_counter() - started
            trial.set_user_attr("n_epochs", len(val_curve))
            trial.set_user_attr("seconds", round(seconds, 3))
            dashboard.note_trial(trial, config.as_params(), n_parameters=n_parameters, n_epochs=len(val_curve),
                                 seconds=seconds, val_curve=val_curve, outcome=outcome)
        student_val_logits = predict(model, trial_data.x_val, compute.autocast_dtype)
        for name, value in health.measure(student_val_logits, teacher_val_logits, trial_data.y_val,
                                          config.temperature).items():
            trial.set_user_attr(name, value)
        return result.val_accuracy

    return objective


# --------------------------------------------------------------------------------- study and storage

def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    search = spec.search
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=search.n_startup_trials,
                                                      n_warmup_steps=search.n_warmup_epochs),
        # asynchronous successive halving: rungs at 1, 3, 9 times the warm-up epochs; a trial goes on from a rung
        # only if it is in the top third of the trials that reached it
        "successive-halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, search.n_warmup_epochs), reduction_factor=3),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=max(1, search.n_warmup_epochs),
                                                            max_resource=spec.student.max_epochs),
        "none": optuna.pruners.NopPruner,
    }[search.pruner]()


def open_study(spec: Spec, *, create: bool, worker: int = 0, read_only: bool = False) -> optuna.Study:
    """Create or resume the spec's study; refuse to resume one made with a different spec.

    Of several processes that start a new study at the same moment, exactly one creates it (the storage holds
    one study per name) and queues its control arms; see `study_setup` for what the others wait for.
    `worker` numbers the processes that `tune --jobs` starts; each samples from its own seed. `read_only`
    (best, status) writes nothing and needs the study to exist.
    """
    path = sqlite_path(spec.storage_url)
    if not create and path is not None and not sqlite_holds_studies(path):  # opening it would create the tables
        raise _no_such_study(spec)
    storage = open_storage(spec.storage_url, spec.workers, read_only=read_only)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if spec.name not in existing and not create:
        raise _no_such_study(spec)
    n_trials = existing[spec.name].n_trials if spec.name in existing else 0
    pruner = make_pruner(spec)
    if spec.name in existing:
        study = optuna.load_study(storage=storage, study_name=spec.name, pruner=pruner)
    else:
        try:
            study = optuna.create_study(storage=storage, study_name=spec.name, direction="maximize", pruner=pruner)
            mark_creator(study)
            enqueue_control_arms(study, spec.search)
        except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago
            study = optuna.load_study(storage=storage, study_name=spec.name, pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(spec.seed, n_trials, worker, joins_live_study(study)))
    recorded = study.user_attrs.get("spec")
    if recorded is not None:
        check_same_spec(spec, recorded, study.user_attrs.get(RECORD_VERSION_KEY))
    return study


def sampler_seed(seed: int, n_trials: int, worker: int, joining: bool) -> int:
    """The seed plus the trials already run, so a resumed study does not replay its first proposals, plus the
    worker's number, so that `--jobs` workers do not propose the same configurations. A process that joins a
    study other processes are running (started at the same moment, or later) cannot know its rank among them:
    its host and process id tell it apart, at the price of a proposal sequence no later run repeats."""
    joiner = zlib.crc32(WORKER_ID.encode()) % WORKER_SEED_STRIDE if joining else 0
    return seed + n_trials + WORKER_SEED_STRIDE * worker + joiner


def joins_live_study(study: optuna.Study) -> bool:
    """Whether another process is setting this study up or running its trials right now (a trial whose worker
    died, or a set-up that was interrupted, does not count: resuming alone stays reproducible)."""
    set_up_by = study.user_attrs.get(SET_UP_BY_KEY)
    setting_up = "spec" not in study.user_attrs and isinstance(set_up_by, dict) and set_up_by["worker"] != WORKER_ID
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return setting_up or bool(running - stale_trial_numbers(study))


def mark_creator(study: optuna.Study) -> None:
    """The study's creator sets it up (teacher, record); others wait until it has (see `study_setup`)."""
    study.set_user_attr(SET_UP_BY_KEY, {"worker": WORKER_ID, "beat": 0})


def check_same_spec(spec: Spec, recorded: dict, record_version: int | None = RECORD_VERSION) -> None:
    current = to_toml_dict(spec)
    if record_version is None and recorded.get("data", {}).get("format") in TRANSPOSED_FORMATS:
        # recorded before `transpose` was honoured for EMNIST's own formats, which were always transposed
        recorded = {**recorded, "data": {**recorded["data"], "transpose": True}}
    # a key missing from the record predates it; such studies ran with its default, which matches
    changed = [k for k in RECORDED_SECTIONS if recorded.get(k, current[k]) != current[k]]
    if changed:
        section = changed[0] if changed[0] in ("seed", "precision") else f"[{changed[0]}] section"
        raise SpecError(f"study {spec.name!r} was made with a different {section}; restore it, "
                        "or start a new study with --study-name.")


def _no_such_study(spec: Spec) -> SpecError:
    return SpecError(f"no study named {spec.name!r} in {spec.storage_url}; run `kdtune tune` first.")


def record(study: optuna.Study, spec: Spec, splits: Splits, teacher: CachedTeacher) -> None:
    """What the study's numbers mean: the resolved spec, teacher, data fingerprint and versions.

    `spec` is written last: processes waiting for the study's set-up go on once it exists (see `study_setup`),
    and must then find everything else recorded.
    """
    if "spec" in study.user_attrs:
        return
    for key, value in {"precision": resolve_compute(spec.device, spec.precision).precision,
                       "teacher_cache_id": teacher.cache_id,
                       "teacher_val_accuracy": teacher.val_accuracy, "data_fingerprint": splits.fingerprint,
                       "versions": versions(), RECORD_VERSION_KEY: RECORD_VERSION,
                       "spec": to_toml_dict(spec)}.items():
        study.set_user_attr(key, value)


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run(study: optuna.Study, objective, *, n_trials: int, timeout: float | None, progress_bar: bool = True) -> None:
    """Run until the study holds `n_trials` finished (complete or pruned) trials, or `timeout` seconds pass.

    Other workers may share the study; each trial first makes sure it is needed (see `wait_for_a_place`).
    Failed trials do not count, so this runs rounds of the missing trials until none is missing, or until a
    round ends with no trial finished anywhere (every trial fails: more rounds would not help).
    Ctrl-C or SIGTERM raises KeyboardInterrupt once no trial of this process is left RUNNING (see interrupts).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    stop = StopRequest()
    callbacks = [MaxTrialsCallback(n_trials, states=FINISHED), stop.stop_after_trial]
    if progress_bar:  # the process that shows the progress warns; other workers stay quiet
        teacher_behind = TeacherBehindWarning()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # a resumed study's controls
            teacher_behind(study, trial)
        callbacks.append(teacher_behind)

    def needed_objective(trial: optuna.Trial) -> float:
        with stop.inside_objective():
            wait_for_a_place(trial, n_trials)
            return objective(trial)

    with stop.installed(), quiet_trial_log(expected=(KeyboardInterrupt, *TRIAL_FAILURES), silent=(SurplusTrial,)):
        while (n_missing := n_trials - n_finished(study)) > 0:
            stop.raise_if_requested()
            seconds_left = None if deadline is None else deadline - time.monotonic()
            if seconds_left is not None and seconds_left <= 0:
                return
            try:
                study.optimize(needed_objective, n_trials=n_missing, timeout=seconds_left, catch=TRIAL_FAILURES,
                               callbacks=callbacks,
                               show_progress_bar=progress_bar)
            except UnboundLocalError as error:
                # Optuna 5.0.0: when the storage fails as a trial ends, _run_trial's clean-up raises
                # UnboundLocalError over the storage error; surface the storage error (the CLI prints one line)
                if isinstance(error.__context__, STORAGE_ERRORS):
                    raise error.__context__ from None
                raise
            stop.raise_if_requested()
            if n_finished(study) == n_trials - n_missing:
                return


class TeacherBehindWarning:
    """An Optuna callback that warns, once, when a student trained without distillation beats the teacher on
    validation: distilling from such a teacher cannot be expected to help, and the user should know before
    the study spends its budget (see the report's verdict for what to do)."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        teacher_accuracy = study.user_attrs.get("teacher_val_accuracy")
        if self.warned or teacher_accuracy is None or trial.state != TrialState.COMPLETE \
                or trial.user_attrs.get("control") != "no_distillation" or trial.value <= teacher_accuracy:
            return
        self.warned = True
        tqdm.write(f"warning: the student of width {trial.params['width']} trained without distillation reaches "
                   f"{trial.value:.4f} validation accuracy, above the teacher's {teacher_accuracy:.4f}: distilling "
                   "from this teacher cannot be expected to help. Consider a stronger teacher (more epochs, more "
                   "data) before spending the study's budget.", file=sys.stderr)


def wait_for_a_place(trial: optuna.Trial, n_trials: int) -> None:
    """Let this trial train only if the trials numbered before it cannot reach `n_trials` without it.

    N workers that each start a trial as the study nears its target would overshoot it by up to N - 1.
    While earlier trials run, wait: if they finish, this trial is surplus and fails at once, untrained. If one
    dies (its worker was killed: it goes stale and is failed after the grace period), its configuration is
    enqueued again, and this trial gives its place to that retry.
    """
    while True:
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
                   if t.number < trial.number]
        if sum(t.state in FINISHED for t in earlier) >= n_trials:
            surplus(trial, "other workers finished the study while it started")
        if len(earlier) < n_trials:
            return
        optuna.storages.fail_stale_trials(trial.study)  # fails a dead worker's trial and enqueues its retry
        if trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            surplus(trial, "it gave its place to a waiting retry")
        time.sleep(PLACE_POLL_SECONDS)


def surplus(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", f"surplus: {reason}")
    raise SurplusTrial(reason)


def best(study: optuna.Study) -> dict:
    try:
        trial = study.best_trial
    except ValueError as error:
        raise SpecError(f"study {study.study_name!r} has no completed trial yet; run `kdtune tune`.") from error
    return {"trial": trial.number, "temperature": trial.params["temperature"], "lambda": trial.params["lambda"],
            "width": trial.params["width"], "val_accuracy": trial.value,
            "n_parameters": trial.user_attrs.get("n_parameters"), "n_epochs": trial.user_attrs.get("n_epochs"),
            "loss": trial.user_attrs["loss"], "control": trial.user_attrs.get("control")}
