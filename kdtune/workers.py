"""Several worker processes on one study (`tune --jobs N`): Optuna's own distributed mode, each process a full
worker on the shared storage, so that workers on other machines can join the same study the same way.

The parent prepares everything once (study, control arms, teacher cache) and then only waits: workers never
train a teacher. Each worker gets its share of the CPUs as torch threads and its own sampler seed.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import warnings
from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdtune import data, hardware, study, study_setup, target
from kdtune.errors import EXIT_USAGE, USER_ERRORS, one_line
from kdtune.optuna_compat import stale_trial_numbers
from kdtune.spec import Spec


@dataclass(frozen=True)
class WorkerJob:
    spec: Spec
    n_trials: int
    timeout: float | None
    worker: int
    n_workers: int


def run_workers(spec: Spec, *, n_trials: int, timeout: float | None, n_workers: int) -> list[int]:
    """Start `n_workers` processes on the spec's study and wait for them; returns their exit codes
    (negative: killed by that signal)."""
    context = multiprocessing.get_context("spawn")  # no fork: torch's thread pools do not survive it
    processes = [context.Process(target=work, args=(WorkerJob(spec, n_trials, timeout, i, n_workers),),
                                 name=f"kdtune-worker-{i}") for i in range(n_workers)]
    for process in processes:
        process.start()

    def forward(signum, frame) -> None:  # a SIGTERM to the parent stops the workers the same way
        for process in processes:
            if process.is_alive():
                process.terminate()

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while any(process.is_alive() for process in processes):
            try:
                for process in processes:
                    process.join()
            except KeyboardInterrupt:  # Ctrl-C reached the workers too (same process group): let them finish
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    return [process.exitcode for process in processes]


def set_up_process(n_threads: int | None = None) -> None:
    """What every kdtune process needs: its torch threads, one-line errors from threads, quiet Optuna logging,
    and SIGTERM (kill, timeout(1), batch schedulers) handled like Ctrl-C, so finished trials are kept and the
    running one is marked failed."""
    hardware.configure_threads(n_threads)
    threading.excepthook = one_line_thread_error
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def one_line_thread_error(args: threading.ExceptHookArgs) -> None:
    """A user error in a background thread is one line too: Optuna's heartbeat thread stops with the storage
    error when the database goes away (the main thread then recovers or stops with its own one line)."""
    if isinstance(args.exc_value, USER_ERRORS):
        print(f"kdtune: the background thread {args.thread.name} stopped: {one_line(args.exc_value)}",
              file=sys.stderr)
    else:
        threading.__excepthook__(args)


def work(job: WorkerJob) -> None:
    """One worker process; a user error ends it with one line and exit code 2, like the CLI."""
    set_up_process(max(1, hardware.available_cpus() // job.n_workers))
    try:
        run_trials(job)
    except USER_ERRORS as error:
        print(f"kdtune tune worker {job.worker}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run_trials(job: WorkerJob) -> None:
    """Its seed, the cached teacher, trials until the study reaches the target."""
    spec = job.spec
    splits = data.prepare(spec.data, spec.seed)
    compute = hardware.resolve_compute(spec.device, spec.precision)
    the_study = study.open_study(spec, create=False, worker=job.worker)
    cached = study_setup.teacher_of(the_study, spec, splits, compute)  # set up by the parent: never a second teacher
    try:
        objective = study.make_objective(spec, splits, cached, compute, job.n_trials)
        target.run(the_study, objective, n_trials=job.n_trials, timeout=job.timeout, progress_bar=job.worker == 0)
    except KeyboardInterrupt:
        pass  # the running trials are marked failed (see target.run); finished trials are in the storage


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def trial_status(the_study: optuna.Study) -> dict:
    """Trials by state, with running trials split into live and stale (no heartbeat for the grace period:
    their worker died), and the waiting trials that retry a failed one."""
    trials = the_study.get_trials(deepcopy=False)
    stale = stale_trial_numbers(the_study)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    running = [t for t in trials if t.state == TrialState.RUNNING]
    counts["stale"] = sum(t.number in stale for t in running)
    counts["running"] -= counts["stale"]
    return {
        "counts": counts,
        "running": [{"trial": t.number, "worker": t.user_attrs.get("worker"), "stale": t.number in stale,
                     "epochs_reported": len(t.intermediate_values),
                     "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None}
                    for t in running],
        "retries": [{"trial": t.number, "retries": RetryHeartbeatStaleTrialCallback.retried_trial_number(t)}
                    for t in trials if t.state == TrialState.WAITING
                    and RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None],
    }
