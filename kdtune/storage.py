"""Opening a study's storage: SQLite tuned for many small commits, any other Optuna RDB URL as given, and
heartbeats so that a worker that dies mid-trial leaves a failed trial that another worker retries."""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdtune.spec import SpecError, WorkersSpec

# How long a SQLite writer waits for another worker's write to finish before giving up.
SQLITE_BUSY_SECONDS = 60
# Processes that open a new database at the same moment race to create its tables (SQLite: "table studies
# already exists"; PostgreSQL: a duplicate key in its catalogue); the loser finds the tables on a second try.
N_OPEN_ATTEMPTS = 5


# scheme://user:PASSWORD@host. SQLAlchemy takes ":" and "/" in a password, and a user may leave an "@" in it
# unescaped: hiding up to the last "@" before a space hides it whole (and at worst the host too, never less)
PASSWORD_IN_URL = re.compile(r"(\b[A-Za-z][\w+.-]*://[^\s:/@]*:)\S*@")
PASSWORD_IN_QUERY = re.compile(r"(\bpassword=)[^\s&'\"]*", re.IGNORECASE)  # ...?password=PASSWORD, as libpq takes it


def hide_passwords(text: str) -> str:
    """`text` with the password of every storage URL in it as ***: postgresql://kdtune:***@host/db. Every
    user error passes through it before it is printed (`errors.one_line`), so that a URL in a message, kdtune's
    own or a driver's, never shows its password on a terminal or in a log."""
    return PASSWORD_IN_QUERY.sub(r"\1***", PASSWORD_IN_URL.sub(r"\1***@", text))


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for any other storage."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_storage(url: str, workers: WorkersSpec | None = None, *, read_only: bool = False
                 ) -> optuna.storages.RDBStorage:
    """The storage at `url`; with `workers`, running trials send heartbeats, and a trial whose worker stopped
    sending them for the grace period is failed and its configuration enqueued again.

    `read_only` opens an existing SQLite database without writing to it (so `best` and `status` work on a
    study.db the user may not write) and creates no table; other storages are opened as given.
    """
    engine_kwargs = {}
    if (path := sqlite_path(url)) is not None:
        if not read_only:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SpecError(f"cannot create {path.parent} for the study database ({error.strerror}); "
                                "choose a writable place with --storage.") from error
        engine_kwargs["creator"] = functools.partial(connect_sqlite, path, read_only=read_only)
    heartbeat = {} if workers is None else {
        "heartbeat_interval": workers.heartbeat_seconds, "grace_period": workers.grace_seconds,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries)}
    attempt = 1
    while True:
        try:
            storage_class = optuna.storages.RDBStorage if path is None else SQLiteStorage
            return storage_class(url, engine_kwargs=engine_kwargs, skip_table_creation=read_only, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) \
                as error:
            if attempt == N_OPEN_ATTEMPTS or not _lost_a_creation_race(error):
                raise _cannot_open(url, error) from error
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            raise _cannot_open(url, error) from error
        time.sleep(0.1 * attempt)
        attempt += 1


def _lost_a_creation_race(error: sqlalchemy.exc.DBAPIError) -> bool:
    reason = str(error.orig).lower()
    return "already exists" in reason or "duplicate key" in reason or "unique constraint" in reason


def _cannot_open(url: str, error: BaseException) -> SpecError:
    reason = str(error).splitlines()[0]
    return SpecError(f"cannot open storage {url!r} ({reason}); check the URL, the server and the driver.")


def sqlite_holds_studies(path: Path) -> bool:
    """Whether the file at `path` is a SQLite database with Optuna's tables (kdtune before 0.2 could leave an
    empty one behind when asked about a study that did not exist)."""
    if not path.is_file():
        return False
    try:
        with closing(_connect_read_only(path)) as connection:
            return connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'studies'").fetchone() is not None
    except sqlite3.DatabaseError as error:
        raise SpecError(f"{path} is not a readable study database ({error}); check --storage.") from error


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Reading a database in WAL mode takes a shared-memory file beside it. In a folder this process may not
    write, that file cannot be made; `immutable` then reads the database as it stands, without one."""
    uri = path.resolve().as_uri()
    connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=SQLITE_BUSY_SECONDS, check_same_thread=False)
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return connection
    except sqlite3.OperationalError:  # "unable to open database file": no shared-memory file here
        connection.close()
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def connect_sqlite(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A study database connection in write-ahead-log mode with synchronous=NORMAL.

    Every trial.report() is a commit; with SQLite's defaults each one waits for two fsyncs. WAL with NORMAL
    syncs only at checkpoints: measured 1.5x less storage time per trial (bench/run.py, overhead section).
    A crashed or killed process loses nothing; a power cut can lose the last commits, never corrupt the
    file. WAL also lets readers (the dashboard, `best`) run while a trial writes, and writers from several
    workers queue for up to SQLITE_BUSY_SECONDS instead of failing at once.
    """
    # check_same_thread=False: the connection pool and Optuna's heartbeat thread hand connections between threads
    if read_only:
        return _connect_read_only(path)
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_SECONDS, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


class SQLiteStorage(optuna.storages.RDBStorage):
    """RDBStorage whose trial state changes are atomic on SQLite too.

    Optuna changes a trial's state by reading it `SELECT ... FOR UPDATE`, then writing it. SQLite ignores FOR
    UPDATE and pysqlite begins the transaction only at the write, so two processes can both read a queued trial
    as WAITING and both claim it (each then trains it; the second to finish fails with "Cannot tell a COMPLETE
    trial"), and a stale-trial reaper can overwrite a trial its worker has just completed. BEGIN IMMEDIATE takes
    the write lock before the read: the loser waits, then sees the state the winner wrote.
    """

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        session = self.scoped_session()
        try:
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            session.rollback()
            session.close()
            raise
        return super().set_trial_state_values(trial_id, state, values)
