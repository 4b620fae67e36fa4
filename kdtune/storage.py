"""Opening a study's storage: SQLite tuned for many small commits, any other Optuna RDB URL as given, and
heartbeats so that a worker that dies mid-trial leaves a failed trial that another worker retries."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RetryHeartbeatStaleTrialCallback

from kdtune.spec import SpecError, WorkersSpec

# How long a SQLite writer waits for another worker's write to finish before giving up.
SQLITE_BUSY_SECONDS = 60


def open_storage(url: str, workers: WorkersSpec | None = None) -> optuna.storages.RDBStorage:
    """The storage at `url`; with `workers`, running trials send heartbeats, and a trial whose worker stopped
    sending them for the grace period is failed and its configuration enqueued again."""
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpecError(f"cannot create {path.parent} for the study database ({error.strerror}); "
                            "choose a writable place with --storage.") from error
        engine_kwargs["creator"] = functools.partial(connect_sqlite, path)
    heartbeat = {} if workers is None else {
        "heartbeat_interval": workers.heartbeat_seconds, "grace_period": workers.grace_seconds,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries)}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise SpecError(f"cannot open storage {url!r} ({reason}); check the URL, the server and the driver.") \
            from error


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """A study database connection in write-ahead-log mode with synchronous=NORMAL.

    Every trial.report() is a commit; with SQLite's defaults each one waits for two fsyncs. WAL with NORMAL
    syncs only at checkpoints: measured 1.5x less storage time per trial (bench/run.py, overhead section).
    A crashed or killed process loses nothing; a power cut can lose the last commits, never corrupt the
    file. WAL also lets readers (the dashboard, `best`) run while a trial writes, and writers from several
    workers queue for up to SQLITE_BUSY_SECONDS instead of failing at once.
    """
    # check_same_thread=False: the connection pool and Optuna's heartbeat thread hand connections between threads
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_SECONDS, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection
