"""What a normal run prints of Optuna's trial log: no tracebacks for the ways kdtune expects trials to end.

Optuna logs every failed trial as a warning with the whole traceback, followed by a second line giving its
value (None when the objective raised). For trials that end in a way kdtune chose — interrupted by Ctrl-C,
diverged, stuck at chance — one line without the traceback says it all (the trial's `fail_reason` holds the
rest); a surplus trial (the normal end of a run with several workers) prints nothing at all.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import optuna

from kdtune.optuna_compat import TRIAL_LOOP_LOGGER_NAME

OPTUNA_TRIAL_LOGGER = logging.getLogger(TRIAL_LOOP_LOGGER_NAME)
NO_VALUE_SUFFIX = "failed with value None."


class QuietTrialLog(logging.Filter):
    def __init__(self, expected: tuple[type[BaseException], ...], silent: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected, self.silent = expected, silent
        self._drop_value_line = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if self._drop_value_line and record.getMessage().endswith(NO_VALUE_SUFFIX):
            self._drop_value_line = False
            return False
        self._drop_value_line = isinstance(error, self.silent + self.expected)
        if isinstance(error, self.silent):
            return False
        if isinstance(error, self.expected):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def quiet_trial_log(expected: tuple[type[BaseException], ...],
                    silent: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Within the block: trials failing with `expected` errors log one line, with `silent` ones nothing."""
    quiet = QuietTrialLog(expected, silent)
    OPTUNA_TRIAL_LOGGER.addFilter(quiet)
    try:
        yield
    finally:
        OPTUNA_TRIAL_LOGGER.removeFilter(quiet)


def log_failed_trial(trial: optuna.Trial, error: BaseException) -> None:
    """Log a failed trial that kdtune stored itself (a batch mate, see `kdtune.study`) as Optuna's trial loop
    logs the trials it runs, so that `quiet_trial_log` treats both alike."""
    OPTUNA_TRIAL_LOGGER.warning(f"Trial {trial.number} failed with parameters: {trial.params} because of the "
                                f"following error: {error!r}.", exc_info=(type(error), error, error.__traceback__))
    OPTUNA_TRIAL_LOGGER.warning(f"Trial {trial.number} failed with value None.")
