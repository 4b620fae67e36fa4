"""Ctrl-C and SIGTERM during a study: stop without leaving a trial RUNNING.

Optuna marks a trial failed when KeyboardInterrupt reaches it inside the objective. Raised anywhere else
in its loop (while `ask()` creates the trial, while the heartbeat thread starts, while `tell()` stores the
result) it leaves the trial RUNNING for good on storages without heartbeats, and for the grace period on
those with them. So the signal interrupts at once only inside the objective; elsewhere it is noted, the
study stops after the trial it is storing, and a trial already created fails as it enters the objective.

Inside the objective, too, a signal must not interrupt a write to the storage: a KeyboardInterrupt in the middle
of a commit leaves the storage's session unusable, so every later write fails, the final one that marks the
trial failed included (seen in one CI run in four: a stop during `trial.report`). The objective's writes run
`uninterrupted()`: the signal waits until the write is done, then interrupts. Trials trained together run
`deferred()`: the signal is polled between epochs, never raised.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import optuna

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Installed for the duration of `study.optimize`; `inside_objective()` wraps the objective's body."""

    def __init__(self) -> None:
        self.requested = False
        self._in_objective = False
        self._writing = False
        self._delivered = False  # the KeyboardInterrupt of this request was raised in the objective already

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._in_objective and not self._writing:
            self._deliver()

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        # a signal ignored when kdtune started stays ignored: a shell starts background jobs with SIGINT ignored,
        # so that a Ctrl-C meant for the foreground does not stop them
        previous = {signum: handler for signum in STOP_SIGNALS
                    if (handler := signal.getsignal(signum)) is not signal.SIG_IGN}
        global _installed
        for signum in previous:
            signal.signal(signum, self._handle)
        _installed = self
        try:
            yield self
        finally:
            _installed = None
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def inside_objective(self) -> Iterator[None]:
        self._in_objective = True
        try:
            self.raise_if_requested()  # the signal came while Optuna created this trial: fail it before it trains
            yield
        finally:
            self._in_objective = False

    def stop_after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An Optuna callback: the signal came while the trial was being stored."""
        if self.requested:
            study.stop()

    def raise_if_requested(self) -> None:
        if self.requested:
            self._deliver()

    def _deliver(self) -> None:
        self._delivered = True
        raise KeyboardInterrupt


_installed: StopRequest | None = None  # the StopRequest of the study running in this process, if any


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A write to the study's storage from inside the objective: a stop signal that comes meanwhile interrupts
    right after it, not in the middle of its commit. Outside a running study it does nothing."""
    request = _installed
    outermost = request is not None and not request._writing  # inside `deferred`, the signal stays deferred
    with deferred():
        yield
    if outermost and request._in_objective and request.requested and not request._delivered:
        request._deliver()  # it came during the write


def stop_requested() -> bool:
    """Whether a stop signal came during the study running in this process: code that runs `deferred` polls it
    where stopping loses nothing."""
    return _installed is not None and _installed.requested


@contextmanager
def deferred() -> Iterator[None]:
    """A block that a stop signal never interrupts: trials trained together (kdtune.batched), where a
    KeyboardInterrupt landing between one student's end and its record would lose a trial that had finished.
    The block polls `stop_requested()` where stopping loses nothing; a stop it leaves pending stops the study
    once the running trial is stored (`StopRequest.stop_after_trial`)."""
    request = _installed
    if request is None or request._writing:
        yield
        return
    request._writing = True
    try:
        yield
    finally:
        request._writing = False
