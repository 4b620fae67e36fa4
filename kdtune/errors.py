"""The errors that are the user's to fix (a bad spec or flag, a missing file, unreachable storage): every
kdtune process reports them as one line and exit code 2, never a traceback."""

import optuna
import sqlalchemy.exc

from kdtune.spec import SpecError
from kdtune.storage import hide_passwords

EXIT_USAGE = 2
# Optuna wraps a failed commit (the database went away mid-run) in StorageInternalError
STORAGE_ERRORS = (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError)
USER_ERRORS = (SpecError, OSError, *STORAGE_ERRORS)


def one_line(error: BaseException) -> str:
    return hide_passwords(_one_line(error))


def _one_line(error: BaseException) -> str:
    if isinstance(error, STORAGE_ERRORS):
        cause = error.__cause__ or error
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        return (f"the study storage failed ({reason}); check that its database is up and reachable, then rerun "
                "the same command to resume: finished trials are kept.")
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}; check the path and its permissions.".lstrip(": ")
    return " ".join(str(error).split())
