"""Ctrl-C and SIGTERM during a study: stop without leaving a trial RUNNING.

Optuna marks a trial failed when KeyboardInterrupt reaches it inside the objective. Raised anywhere else
in its loop (while `ask()` creates the trial, while the heartbeat thread starts, while `tell()` stores the
result) it leaves the trial RUNNING for good on storages without heartbeats, and for the grace period on
those with them. So the signal interrupts at once only inside the objective; elsewhere it is noted, the
study stops after the trial it is storing, and a trial already created fails as it enters the objective.
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

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._in_objective:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        # a signal ignored when kdtune started stays ignored: a shell starts background jobs with SIGINT ignored,
        # so that a Ctrl-C meant for the foreground does not stop them
        previous = {signum: handler for signum in STOP_SIGNALS
                    if (handler := signal.getsignal(signum)) is not signal.SIG_IGN}
        for signum in previous:
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
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
            raise KeyboardInterrupt
