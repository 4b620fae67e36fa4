"""Running a study to its target: `tune --trials N` ends with the study holding exactly N finished (complete or
pruned) trials, however many workers share it, whichever trials fail, and whenever Ctrl-C comes.

N workers that each start a trial as the study nears its target would overshoot it by up to N - 1, so a trial
first makes sure the study still needs it (`wait_for_a_place`); one that is not needed fails at once, untrained.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm import tqdm

from kdtune import health
from kdtune.errors import STORAGE_ERRORS
from kdtune.interrupts import StopRequest, uninterrupted
from kdtune.optuna_compat import give_first_heartbeats, heartbeat
from kdtune.train import TrainingDiverged
from kdtune.trial_log import log_failed_trial, quiet_trial_log

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# How often a trial waiting for a place looks again. Every second costs one small query per waiting worker;
# polling at the heartbeat interval (10 s) kept `tune --jobs 2` idle for up to 10 s as the study ended.
PLACE_POLL_SECONDS = 1.0


class SurplusTrial(Exception):
    """Workers sharing a study started more trials than it needed; this one never trains."""


# A trial that ends this way is recorded as failed, with its reason, and the study goes on.
TRIAL_FAILURES = (TrainingDiverged, health.StuckAtChance, SurplusTrial)


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
    progress = None
    if progress_bar:  # the process that shows the progress warns; other workers stay quiet
        teacher_behind = health.TeacherBehindWarning()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # a resumed study's controls
            teacher_behind(study, trial)
        progress = Progress(study, n_trials)
        callbacks += [teacher_behind, progress]

    def needed_objective(trial: optuna.Trial) -> float:
        with stop.inside_objective():
            wait_for_a_place(trial, n_trials)
            return objective(trial)

    with stop.installed(), quiet_trial_log(expected=(KeyboardInterrupt, *TRIAL_FAILURES), silent=(SurplusTrial,)), \
            progress if progress else nullcontext():
        while (n_missing := n_trials - n_finished(study)) > 0:
            stop.raise_if_requested()
            seconds_left = None if deadline is None else deadline - time.monotonic()
            if seconds_left is not None and seconds_left <= 0:
                return
            try:
                study.optimize(needed_objective, n_trials=n_missing, timeout=seconds_left, catch=TRIAL_FAILURES,
                               callbacks=callbacks)
            except UnboundLocalError as error:
                # Optuna 5.0.0: when the storage fails as a trial ends, _run_trial's clean-up raises
                # UnboundLocalError over the storage error; surface the storage error (the CLI prints one line)
                if isinstance(error.__context__, STORAGE_ERRORS):
                    raise error.__context__ from None
                raise
            stop.raise_if_requested()
            # no trial finished anywhere: more rounds would not help, unless this one gave its place to a retry
            if n_finished(study) == n_trials - n_missing and not any(
                    RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None
                    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
                return


class Progress:
    """An Optuna callback: the run's progress bar, the study's finished trials out of the run's target. Optuna's
    own bar counts the trials its loop runs, and would miss the batch mates kdtune stores itself. As Optuna's
    bar does, it takes Optuna's log lines while it is open (a context manager), written above the bar."""

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study, self.n_trials = study, n_trials

    def __enter__(self) -> Progress:
        self.bar = tqdm(total=self.n_trials, initial=min(n_finished(self.study), self.n_trials))
        self.log = TqdmHandler()
        self.log.setFormatter(optuna.logging.create_default_formatter())
        optuna_logger = logging.getLogger("optuna")
        attached = list(optuna_logger.handlers)
        optuna.logging.disable_default_handler()
        self.had_default_handler = len(optuna_logger.handlers) < len(attached)
        optuna_logger.addHandler(self.log)
        return self

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.bar.n = min(n_finished(study), self.bar.total)
        try:
            best = study.best_trial
            self.bar.set_description(f"Best trial: {best.number}. Best value: {best.value:.6g}", refresh=False)
        except ValueError:  # no trial complete yet
            pass
        self.bar.refresh()

    def __exit__(self, *exc_info) -> None:
        self.bar.close()
        logging.getLogger("optuna").removeHandler(self.log)
        if self.had_default_handler:
            optuna.logging.enable_default_handler()


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def wait_for_a_place(trial: optuna.Trial, n_trials: int) -> None:
    """Let this trial train only if the trials numbered before it cannot reach `n_trials` without it.

    While earlier trials run, wait: if they finish, this trial is surplus and fails at once, untrained. If one
    dies (its worker was killed: it goes stale and is failed after the grace period), its configuration is
    enqueued again, and this trial gives its place to that retry.
    """
    while True:
        earlier = earlier_trials(trial)
        if sum(t.state in FINISHED for t in earlier) >= n_trials:
            surplus(trial, "other workers finished the study while it started")
        if len(earlier) < n_trials:
            return
        give_first_heartbeats(trial.study)  # a worker that died before its trial's first heartbeat: stale too
        optuna.storages.fail_stale_trials(trial.study)  # fails a dead worker's trial and enqueues its retry
        if trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            surplus(trial, "it gave its place to a waiting retry")
        time.sleep(PLACE_POLL_SECONDS)


@contextmanager
def batch_mates(trial: optuna.Trial, n_wanted: int, n_trials: int, band_attrs: dict,
                band_has_room: Callable[[], bool]) -> Iterator[list[optuna.Trial]]:
    """Up to `n_wanted` more trials, asked now to train beside `trial` (`band_attrs`: the user attributes that
    place them in its band, set before the sampler proposes anything), each with its heartbeat while the block
    runs: a killed worker's mates go stale and are retried like any trial.

    Only as many as the study still needs (`trial` has its place: see `wait_for_a_place`) and the band's share
    allows (`band_has_room`, asked before each), and none while a queued trial waits (a control arm or a retry
    goes first). A trial queued by another worker as this one asked comes back as a mate all the same: it
    keeps its own band and settings. A mate the block leaves unfinished (it raised) is failed as it ends, so
    that none stays RUNNING.
    """
    study = trial.study
    mates: list[optuna.Trial] = []
    with ExitStack() as heartbeats:
        try:
            while len(mates) < n_wanted and has_room(study, n_trials) and band_has_room():
                with uninterrupted():
                    mate = study.ask()
                    mates.append(mate)
                    heartbeats.enter_context(heartbeat(study, mate))
                    queued = any(key in mate.user_attrs for key in band_attrs)
                    for key, value in ({} if queued else band_attrs).items():
                        mate.set_user_attr(key, value)
                # another worker asked at the same moment, and it holds the place: this one is surplus
                if len(earlier_trials(mate)) >= n_trials:
                    with uninterrupted():
                        mate.set_user_attr("fail_reason", "surplus: another worker took its place")
                        study.tell(mate, state=TrialState.FAIL)
                    mates.pop()
                    break
                if queued:
                    break
            yield mates
        except BaseException as error:
            fail_unfinished(study, mates, error)
            raise
        else:
            fail_unfinished(study, mates, None)


def fail_unfinished(study: optuna.Study, mates: list[optuna.Trial], error: BaseException | None) -> None:
    """Fail the mates still RUNNING as their batch ends with `error`, logged as Optuna logs a failed trial."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for mate in (mate for mate in mates if mate.number in running):
        reason = error if error is not None else RuntimeError("its batch ended before it was stored")
        with uninterrupted():
            mate.set_user_attr("fail_reason", f"its batch ended: {reason!r}")
            study.tell(mate, state=TrialState.FAIL, skip_if_finished=True)
        log_failed_trial(mate, reason)


def has_room(study: optuna.Study, n_trials: int) -> bool:
    """Whether a trial asked now would have its place, with no queued trial waiting to go first."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    return (not any(t.state == TrialState.WAITING for t in trials)) and len(trials) < n_trials


def earlier_trials(trial: optuna.Trial) -> list[optuna.trial.FrozenTrial]:
    """The finished and running trials numbered before `trial`: those that reach the target before it."""
    return [t for t in trial.study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
            if t.number < trial.number]


def surplus(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", f"surplus: {reason}")
    raise SurplusTrial(reason)
