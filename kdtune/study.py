"""The Optuna study: storage, sampler, pruner, the objective, and the record a study keeps of itself.

An Optuna adapter: the student itself (its configuration, size and training) is `kdtune.student`'s. Trials
train a student on the cached teacher logits only (the teacher never runs inside a trial) and see the train
and validation tensors only: the test set is not passed in.
"""

from __future__ import annotations

import functools
import os
import socket
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import TrialState
from torch import nn

from kdtune import bands, batched, cost, dashboard, front, health, student, target
from kdtune.bands import Band
from kdtune.budget import Budget
from kdtune.data import Splits
from kdtune.hardware import Compute
from kdtune.interrupts import deferred, stop_requested, uninterrupted
from kdtune.optuna_compat import stale_trial_numbers
from kdtune.per_band import PerBandPruner, PerBandSampler
from kdtune.provenance import versions
from kdtune.spec import EXTRA_SEARCHES, TRANSPOSED_FORMATS, SearchSpec, Spec, SpecError, to_toml_dict
from kdtune.storage import open_storage, sqlite_holds_studies, sqlite_path
from kdtune.student import StudentConfig
from kdtune.target import FINISHED, TRIAL_FAILURES
from kdtune.teacher import CachedTeacher
from kdtune.train import FitResult, StopTraining, TrainingDiverged, TrainingInterrupted, predict
from kdtune.transfer import StudentData
from kdtune.trial_log import log_failed_trial

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
WORKER_SEED_STRIDE = 1_000_003  # a prime far above any trial count
# Spec sections that decide what a trial's value means: resuming with any of them changed would mix
# incomparable trials in one study.
RECORDED_SECTIONS = ("seed", "precision", "data", "teacher", "student", "search", "transfer")
# study user attribute: the process setting a new study up, {"worker": host:pid, "beat": n}; None once it stopped
SET_UP_BY_KEY = "set_up_by"
# study user attribute: the sha256 of a user student family's module source (see study_setup.check_same_students)
STUDENT_SOURCE_KEY = "student_source_sha256"
# study user attribute: how the record reads; absent in studies recorded before it existed
RECORD_VERSION_KEY, RECORD_VERSION = "record_version", 3


def suggest(trial: optuna.Trial, search: SearchSpec, loss: str | list, band: Band) -> StudentConfig:
    """The sampler's proposal, its width within the trial's band. A list of losses is searched: the form is a
    categorical param, and each form samples its own params from its own ranges (`SearchSpec.ranges_of`), under
    the names `student.optuna_name` gives them."""
    if isinstance(loss, list):
        loss = trial.suggest_categorical("loss", loss) if len(loss) > 1 else loss[0]
    params = {name: trial.suggest_float(student.optuna_name(loss, name), r.low, r.high, log=log and not r.fixed)
              for name, (r, log) in search.ranges_of(loss).items()}
    return StudentConfig.from_params({
        "temperature": 1.0, **params, "loss": loss,
        "width": trial.suggest_int("width", band.min_width, band.max_width, log=band.min_width < band.max_width)})


def control_arms(search: SearchSpec, loss: str | list, size_bands: list[Band],
                 reference: bool = True) -> list[tuple[StudentConfig, str]]:
    """(config, control) of the trials every study runs first: the seed project's configuration (with
    `reference`: students of its family), and the student without distillation (lambda = 1, in the spec's
    `loss`, hinton's where the study searches the form: at lambda = 1 every form is the same) at the middle
    width of every size band; a study of one band, at its smallest, middle and largest
    width, as before bands. Arms outside the search ranges and bands are left out."""
    widths = {band.middle_width() for band in size_bands}
    if len(size_bands) == 1:
        widths |= {size_bands[0].min_width, size_bands[0].max_width}
    arms = [(student.REFERENCE, "reference")] if reference else []
    # the spec's form where lambda = 1 lies in its range (hinton, reference), else hinton's: the same student
    alone = loss if isinstance(loss, str) and loss not in EXTRA_SEARCHES else "hinton"
    arms += [(StudentConfig(search.temperature.low, 1.0, w, alone), "no_distillation") for w in sorted(widths)]
    return [(config, control) for config, control in arms
            if config.within(search) and bands.band_of_width(size_bands, config.width) is not None]


def enqueue_control_arms(study: optuna.Study, search: SearchSpec, loss: str | list, size_bands: list[Band],
                         reference: bool = True) -> None:
    """Queue the control arms ahead of the sampler, each in its band, unless the spec turns them off. Arms are
    queued in order, so a set-up interrupted part-way leaves the first few: only the rest are queued."""
    if search.control_arms:
        n_queued = sum("control" in t.user_attrs for t in study.get_trials(deepcopy=False))
        for config, control in control_arms(search, loss, size_bands, reference)[n_queued:]:
            params = config.as_params()
            band = bands.band_of_width(size_bands, config.width)
            study.enqueue_trial(params, user_attrs={"control": control, "loss": params.pop("loss"),
                                                    bands.TRIAL_KEY: band.index})


def assign_band(trial: optuna.Trial, size_bands: list[Band]) -> Band:
    """The trial's band: the one it was queued in (a control arm, a retry), else the band with the fewest
    trials that count or will (finished, running, waiting), the narrowest of equals: every band gets an equal
    share of the study's trials."""
    if bands.TRIAL_KEY not in trial.user_attrs:
        counts = trials_by_band(trial.study, excluding=trial.number)
        chosen = min(size_bands, key=lambda band: (counts[band.index], band.index))
        with uninterrupted():
            trial.set_user_attr(bands.TRIAL_KEY, chosen.index)
    return size_bands[trial.user_attrs[bands.TRIAL_KEY]]


def trials_by_band(study: optuna.Study, excluding: int | None = None) -> Counter:
    """How many trials of each band (by index) count or will (finished, running, waiting); trials not yet
    placed in a band, and the trial numbered `excluding`, are not counted."""
    return Counter(bands.of_trial(t) for t in study.get_trials(
        deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
        if t.number != excluding and bands.TRIAL_KEY in t.user_attrs)


def study_bands(study: optuna.Study, spec: Spec, architecture: student.Architecture,
                teacher: CachedTeacher) -> list[Band]:
    """The bands the study recorded at its set-up, or, before that, the spec's. A study made before bands
    records its one band as it resumes, so that every command labels its trials alike."""
    recorded = bands.recorded(study)
    if recorded is not None:
        return recorded
    size_bands = bands.size_bands(spec.search, architecture, teacher.n_parameters)
    if "spec" in study.user_attrs:  # set up before bands existed
        with uninterrupted():
            bands.record(study, size_bands)
    return size_bands


@dataclass
class Member:
    """A trial about to train its student: its band, configuration, size and precision."""

    trial: optuna.Trial
    band: Band
    config: StudentConfig
    n_parameters: int
    trained_in: Compute


# How a member's training ended: its model (None when it has no trained weights), its result, and what ended it
# otherwise (TrainingDiverged, TrainingInterrupted), if anything.
Trained = tuple[nn.Module | None, FitResult, BaseException | None]


def make_objective(spec: Spec, splits: Splits, teacher: CachedTeacher, compute: Compute,
                   n_trials: int | None = None) -> Callable[[optuna.Trial], float]:
    """The objective of `target.run`. Given the run's `n_trials`, a trial of a band whose students train
    together (`student.trains_together`) asks for up to `spec.batch_students - 1` more trials of its band
    (`target.batch_mates`) and trains their students with its own in one batch: every one of them still its
    own trial, with its own pruning, heartbeat and record. Each mate is stored as soon as its student leaves
    the batch; the trial itself, as the objective returns."""
    data = StudentData.build(splits, teacher.logits["train"], spec.transfer, spec.seed, compute.device)
    architecture = student.Architecture.of(spec.student, data.input_shape, data.n_classes)
    teacher_val_logits = teacher.logits["val"].to(compute.device)

    size_bands: list[Band] = []  # read from the study at its first trial
    study_compute: list[Compute] = []  # likewise

    def start(trial: optuna.Trial, band: Band) -> Member:
        with uninterrupted():  # every write to the storage: a stop signal waits for it (see interrupts)
            config = suggest(trial, spec.search, trial.user_attrs.get("loss", spec.student.loss), band)
        member = Member(trial, band, config, architecture.n_parameters(config.width),
                        architecture.compute_for(config.width, study_compute[0]))
        # before training: pruned trials too
        costs = cost.of_student(architecture, config.width, onnxruntime=spec.onnxruntime_latency)
        with uninterrupted():
            # `worker`: `status` shows where a running trial runs
            for name, value in {"loss": config.loss, "worker": WORKER_ID, "n_parameters": member.n_parameters,
                                "precision": member.trained_in.precision, **costs}.items():
                trial.set_user_attr(name, value)
            if "trained_with" in trial.user_attrs:  # a retry inherits its batch's: it trains alone unless batched
                trial.set_user_attr("trained_with", [trial.number])
        return member

    def train_alone(member: Member) -> Trained:
        try:
            model, result = student.train(member.config, architecture, spec.student, data, spec.seed,
                                          member.trained_in, report=pruning(member.trial))
        except (TrainingDiverged, TrainingInterrupted) as ended:  # no model, but the epochs trained before
            return None, ended.result, ended
        return model, result, None

    def train_group(group: list[Member], end: Callable[[Member, Trained], None]) -> None:
        """One batch; after a stop, its members still training end interrupted."""
        with uninterrupted():  # the dashboard and `status` show which trials train together
            for member in group:
                member.trial.set_user_attr("trained_with", [m.trial.number for m in group])

        def ended(member: Member, model: nn.Module, outcome: batched.Outcome) -> None:
            end(member, (None if outcome.error else model, outcome.result, outcome.error))

        try:
            student.train_together([m.config for m in group], architecture, spec.student, data, spec.seed,
                                   study_compute[0], [pruning(m.trial) for m in group],
                                   [functools.partial(ended, m) for m in group], stop=stop_requested)
        except batched.BatchInterrupted as stop:
            for index, outcome in stop.interrupted.items():
                end(group[index], (None, outcome.result, TrainingInterrupted(outcome.result)))

    def train(members: list[Member], end: Callable[[Member, Trained], None]) -> None:
        """Each group of members that can train together in one batch, the others alone, each member's end
        handed to `end` as soon as it has one. After a stop, the members not yet trained end interrupted; a
        batch polls for a stop after every epoch (see `objective`)."""
        groups: dict[object, list[Member]] = {}
        for member in members:
            key = student.batch_key(member.config, architecture, study_compute[0])
            groups.setdefault(("alone", member.trial.number) if key is None else key, []).append(member)
        for group in groups.values():
            if stop_requested():  # it stays requested: every later group ends interrupted too
                for member in group:
                    result = FitResult(0.0, 0, 0.0)
                    end(member, (None, result, TrainingInterrupted(result)))
            elif len(group) == 1:
                end(group[0], train_alone(group[0]))
            else:
                train_group(group, end)

    def conclude(member: Member, trained: Trained) -> float:
        """The trial's value, or the exception that ends it (pruned, failed, interrupted), its record kept."""
        model, result, ended = trained
        trial, config = member.trial, member.config
        try:
            if ended is not None:
                raise ended
            if result.stopped_early:
                raise optuna.TrialPruned(result.stopped_early)
            health.check_learnt(result.val_accuracy, data.n_classes)
        except (optuna.TrialPruned, health.StuckAtChance, TrainingDiverged, TrainingInterrupted) as reason:
            record_end(trial, config, member.band, member.n_parameters, result, reason)
            raise
        record_end(trial, config, member.band, member.n_parameters, result)
        student_val_logits = predict(model, data.x_val, member.trained_in.autocast_dtype)
        with uninterrupted():
            for name, value in health.measure(student_val_logits, teacher_val_logits, data.y_val,
                                              config.temperature).items():
                trial.set_user_attr(name, value)
        return result.val_accuracy

    def objective(trial: optuna.Trial) -> float:
        if not size_bands:
            size_bands.extend(study_bands(trial.study, spec, architecture, teacher))
            study_compute.append(students_compute(trial.study, compute))
        band = assign_band(trial, size_bands)
        first = start(trial, band)
        if n_trials is None or spec.batch_students == 1 or not student.trains_together(
                architecture, study_compute[0], band.max_width):
            return conclude(first, train_alone(first))
        share = -(-n_trials // len(size_bands))  # every band gets an equal share of the run (see assign_band)
        first_end: list[Trained] = []

        def end(member: Member, trained: Trained) -> None:
            if member is first:
                first_end.append(trained)  # Optuna's loop stores it as the objective returns
            else:
                tell(member.trial, functools.partial(conclude, member, trained))

        # Trials trained together store each mate as its student ends, while the others train on: a stop
        # signal landing between a student's end and its record would lose a finished trial, so none lands
        # here. The batch polls for it after every epoch, and the trials still training end interrupted.
        with deferred(), target.batch_mates(trial, spec.batch_students - 1, n_trials, {bands.TRIAL_KEY: band.index},
                                            lambda: trials_by_band(trial.study)[band.index] < share) as mates:
            train([first] + [start(mate, assign_band(mate, size_bands)) for mate in mates], end)
            return conclude(first, first_end[0])

    return objective


def tell(trial: optuna.Trial, concluded: Callable[[], float]) -> None:
    """Store a batch mate's end (`concluded()`: its value, or the exception that ends it) as Optuna's trial loop
    stores the trial it runs: complete with its value, pruned, or failed and logged. A mate another worker has
    failed meanwhile (it looked dead) stays failed: its retry is queued already."""
    study = trial.study
    try:
        try:
            value = concluded()
        except optuna.TrialPruned:
            with uninterrupted():
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        except (*TRIAL_FAILURES, TrainingInterrupted) as failure:
            log_failed_trial(trial, failure)
            with uninterrupted():
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            with uninterrupted():
                study.tell(trial, value, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # its record's first write found it failed


def students_compute(study: optuna.Study, compute: Compute) -> Compute:
    """What the study's students train in: `compute`, except in an `auto` study begun before auto went by the
    student's size. It recorded plain "bf16" and trained every student so; it goes on so, and its report too,
    so that its trials and its report's students stay alike."""
    if compute.by_student_size and study.user_attrs.get("precision") == "bf16":
        return Compute(compute.device, compute.autocast_dtype)
    return compute


def pruning(trial: optuna.Trial) -> Callable[[int, float], None]:
    """The `report` callable of a trial's training: each epoch's validation accuracy goes to Optuna's pruner,
    whose verdict stops the training."""
    def report(epoch: int, val_accuracy: float) -> None:
        with uninterrupted():
            try:
                trial.report(val_accuracy, epoch)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it: it looked dead
                raise StopTraining(f"failed by another worker after epoch {epoch + 1}; retried") from None
            prune = trial.should_prune()
        if prune:
            raise StopTraining(f"pruned after epoch {epoch + 1} at val_accuracy={val_accuracy:.4f}")

    return report


def record_end(trial: optuna.Trial, config: StudentConfig, band: Band, n_parameters: int, result: FitResult,
               ended: BaseException | None = None) -> None:
    """What a trial keeps however it ends, pruned and failed ones too: its cost and its dashboard note."""
    with uninterrupted():  # pruned, failed and interrupted trials keep all of it
        if isinstance(ended, TRIAL_FAILURES):
            trial.set_user_attr("fail_reason", str(ended))
        if ended is None:
            outcome = f"complete, best validation accuracy {100 * result.val_accuracy:.2f}%"
        elif isinstance(ended, KeyboardInterrupt):
            outcome = "interrupted"
        else:
            outcome = f"failed: {ended}" if isinstance(ended, TRIAL_FAILURES) else str(ended)
        trial.set_user_attr("n_epochs", result.n_epochs)
        trial.set_user_attr("seconds", round(result.seconds, 3))
        dashboard.note_trial(trial, config, n_parameters=n_parameters, n_epochs=result.n_epochs, seconds=result.seconds,
                             val_curve=result.val_curve, outcome=outcome, costs=trial.user_attrs,
                             band=band.label)


# --------------------------------------------------------------------------------- study and storage

def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The spec's pruner, judging each trial among the trials of its size band. A study of one band gets
    Optuna's pruner itself: Optuna's samplers then see Hyperband's brackets, which they recognise by type."""
    search = spec.search
    pruner = {
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
    return pruner if search.bands == "none" or search.width.fixed else PerBandPruner(pruner)


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE, sampling each trial's parameters from the trials of its size band."""
    return PerBandSampler(optuna.samplers.TPESampler(seed=seed))


def open_study(spec: Spec, *, create: bool, worker: int = 0, read_only: bool = False) -> optuna.Study:
    """Create or resume the spec's study; refuse to resume one made with a different spec.

    Of several processes that start a new study at the same moment, exactly one creates it (the storage holds
    one study per name) and sets it up; see `study_setup` for what the others wait for.
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
            mark_creator(study)  # who then sets it up: its teacher, bands, control arms (see study_setup)
        except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago
            study = optuna.load_study(storage=storage, study_name=spec.name, pruner=pruner)
    study.sampler = make_sampler(sampler_seed(spec.seed, n_trials, worker, joins_live_study(study)))
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
    recorded = as_recorded_now(recorded, record_version)
    changed = [k for k in RECORDED_SECTIONS if recorded[k] != current[k]]
    if changed:
        section = changed[0] if changed[0] in ("seed", "precision") else f"[{changed[0]}] section"
        only_bands = changed == ["search"] and {**recorded["search"], "bands": current["search"]["bands"]} == \
            current["search"]
        raise SpecError(f"study {spec.name!r} was made with a different {section}; restore it, "
                        "or start a new study with --study-name." + (
                            ' It was made before size bands: add bands = "none" to its [search] section.'
                            if only_bands and (record_version or 1) < 3 else ""))


def as_recorded_now(recorded: dict, record_version: int | None) -> dict:
    """A study's recorded spec as this kdtune would record the spec it ran with. A key or section the record
    predates ran with its default, except where the default changed since."""
    defaults = to_toml_dict(Spec(name=""))
    recorded = {**{key: defaults[key] for key in RECORDED_SECTIONS}, **recorded}
    recorded = {key: {**defaults[key], **value} if isinstance(value, dict) and isinstance(defaults.get(key), dict)
                else value for key, value in recorded.items()}
    if record_version is None and recorded["data"].get("format") in TRANSPOSED_FORMATS:
        # recorded before `transpose` was honoured for EMNIST's own formats, which were always transposed
        recorded["data"] = {**recorded["data"], "transpose": True}
    if (record_version or 1) < 3:  # studies made before size bands had one band
        recorded["search"] = {**recorded["search"], "bands": "none"}
    return recorded


def _no_such_study(spec: Spec) -> SpecError:
    return SpecError(f"no study named {spec.name!r} in {spec.storage_url}; run `kdtune tune` first.")


def record(study: optuna.Study, spec: Spec, splits: Splits, teacher: CachedTeacher, compute: Compute) -> None:
    """What the study's numbers mean: the resolved spec and precision, size bands, teacher, data fingerprint
    and versions.

    `spec` is written last: processes waiting for the study's set-up go on once it exists (see `study_setup`),
    and must then find everything else recorded.
    """
    if "spec" in study.user_attrs:
        return
    architecture = student.Architecture.of(spec.student, splits.input_shape, splits.n_classes)
    bands.record(study, study_bands(study, spec, architecture, teacher))
    if "source_sha256" in (students := architecture.as_record()):
        study.set_user_attr(STUDENT_SOURCE_KEY, students["source_sha256"])
    for key, value in {"precision": compute.policy,
                       "teacher_cache_id": teacher.cache_id,
                       "teacher_val_accuracy": teacher.val_accuracy, "data_fingerprint": splits.fingerprint,
                       "versions": versions(), RECORD_VERSION_KEY: RECORD_VERSION,
                       "spec": to_toml_dict(spec)}.items():
        study.set_user_attr(key, value)


def best(study: optuna.Study, budget: Budget = Budget()) -> dict:
    """The trial with the best validation accuracy (Optuna's best trial), or the best within `budget`, ties
    there going to the smaller student; and the front: the best of each size band, within `budget`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SpecError(f"study {study.study_name!r} has no completed trial yet; run `kdtune tune`.")
    trial = study.best_trial if budget == Budget() else front.best_of(budget.select(complete, study.study_name))
    params = StudentConfig.from_trial(trial).as_params()
    loss = params.pop("loss")  # after the numbers, where `best --json` has always put it
    return {"trial": trial.number, **params, "val_accuracy": trial.value,
            "n_parameters": trial.user_attrs.get("n_parameters"), "n_epochs": trial.user_attrs.get("n_epochs"),
            "loss": loss, "control": trial.user_attrs.get("control"), "front": front.best_per_band(study, budget)}
