"""The errors that are the user's to fix (a bad spec or flag, a missing file, unreachable storage): every
kdtune process reports them as one line and exit code 2, never a traceback."""

import sqlalchemy.exc

from kdtune.spec import SpecError

EXIT_USAGE = 2
USER_ERRORS = (SpecError, OSError, sqlalchemy.exc.OperationalError)


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}; check the path and its permissions.".lstrip(": ")
    return " ".join(str(error).split())
