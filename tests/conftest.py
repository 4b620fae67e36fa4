"""Shared fixtures: a tiny slice of the embedded Fashion-MNIST and specs that train in seconds."""

import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from kdtune.cli import main
from kdtune.hardware import Compute
from kdtune.optuna_compat import TRIAL_LOOP_LOGGER_NAME
from kdtune.readers import read_embedded

REPO = Path(__file__).resolve().parents[1]
# What the tiny spec's device = "cpu" and default precision (fp32) resolve to.
CPU_FP32 = Compute(torch.device("cpu"))
TINY_SPEC = """
seed = 0
device = "cpu"
[data]
format = "npz"
path = "{path}"
[teacher]
max_epochs = 2
batch_size = 64
[student]
max_epochs = {student_epochs}
patience_epochs = 10
batch_size = 64
[search]
width = {width}
pruner = "{pruner}"
n_startup_trials = {n_startup_trials}
n_warmup_epochs = 0
{search}
[report]
n_seeds = 2
"""


def write_tiny_npz(path: Path, n_train_per_class: int = 30, n_test_per_class: int = 10) -> Path:
    """The first images of each class from the embedded data: real pixels, a few hundred of them."""
    full = read_embedded()
    def take(y: np.ndarray, n: int) -> np.ndarray:
        return np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
    train, test = take(full.y_train, n_train_per_class), take(full.y_test, n_test_per_class)
    np.savez(path, x_train=full.x_train[train], y_train=full.y_train[train],
             x_test=full.x_test[test], y_test=full.y_test[test])
    return path


def write_png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height grey pixels, with hardly any data: a decompression bomb's
    header, which Pillow refuses on opening, before decoding anything."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def trial_log():
    """The records Optuna's trial loop logs during the test (its loggers do not propagate to pytest's capture)."""
    collected = Collect()
    logger = logging.getLogger(TRIAL_LOOP_LOGGER_NAME)
    logger.addHandler(collected)
    yield collected.records
    logger.removeHandler(collected)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch working directory: kdtune writes studies/ relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_spec(workdir):
    """Write a tiny spec (options overridable) and return its path."""
    npz = write_tiny_npz(workdir / "tiny.npz")

    def make(name: str = "tiny", *, student_epochs: int = 3, width: str = "[8, 64]", pruner: str = "median",
             n_startup_trials: int = 5, search: str = "", extra: str = "") -> Path:
        path = workdir / f"{name}.toml"
        path.write_text(TINY_SPEC.format(path=npz, student_epochs=student_epochs, width=width, pruner=pruner,
                                         n_startup_trials=n_startup_trials, search=search) + extra)
        return path
    return make


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python cli.py ...` in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# Where the modules a test session starts with come from: Python, its packages, this repository. A module
# imported from anywhere else is a test's own (a user's teacher or student family in its temporary folder).
INSTALLED = tuple(dict.fromkeys(Path(entry or REPO).resolve() for entry in [*sys.path, str(REPO)]))


def drop_user_modules() -> None:
    """Forget the tests' own modules: each is written in its test's folder, often under a name another test
    used, and a command importing it must read this test's file, as a new interpreter would."""
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if source and source.endswith(".py") and not any(Path(source).resolve().is_relative_to(root)
                                                         for root in INSTALLED):
            del sys.modules[name]


def cli_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`kdtune.cli.main(args)` in this process, run from `cwd`: what `run_cli` checks (exit code, stdout,
    stderr) without a new interpreter's ~3 s of imports. For commands whose signals and processes are not under
    test. stderr collects what a new interpreter would print there: Optuna's log lines and Python's warnings
    under its default filters. Afterwards it puts back what a command changes for the whole process: torch
    threads and RNG, Optuna's verbosity, signal handlers, the thread excepthook, the working directory and
    sys.path, and forgets the test's modules (written without bytecode, so an edit within the same second is
    read too)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    drop_user_modules()
    folder, path, n_threads = os.getcwd(), list(sys.path), torch.get_num_threads()
    excepthook, verbosity, write_bytecode = threading.excepthook, optuna.logging.get_verbosity(), \
        sys.dont_write_bytecode
    optuna_lines = logging.StreamHandler(stderr)
    logging.getLogger("optuna").addHandler(optuna_lines)
    sys.dont_write_bytecode = True
    try:
        with signal_handlers({signal.SIGINT: signal.getsignal(signal.SIGINT),
                              signal.SIGTERM: signal.getsignal(signal.SIGTERM)}), \
                redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings(), \
                torch.random.fork_rng(devices=[]):
            warnings.resetwarnings()  # Python's defaults, as a new interpreter has them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            os.chdir(cwd)
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code
    finally:
        logging.getLogger("optuna").removeHandler(optuna_lines)
        os.chdir(folder)
        sys.path[:] = path
        torch.set_num_threads(n_threads)
        threading.excepthook = excepthook
        optuna.logging.set_verbosity(verbosity)
        sys.dont_write_bytecode = write_bytecode
        drop_user_modules()
    return subprocess.CompletedProcess(["kdtune", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One tiny study taken through the commands once per test session, as a user runs them: teacher (twice:
    the second finds the cache), tune to 3 trials then resumed to 5, best, report, and report again (it
    resumes from the students it kept). Returns the working folder, the spec and each command's result."""
    workdir = tmp_path_factory.mktemp("tiny-study")
    spec = workdir / "tiny.toml"
    spec.write_text(TINY_SPEC.format(path=write_tiny_npz(workdir / "tiny.npz"), student_epochs=3, width="[8, 64]",
                                     pruner="median", n_startup_trials=5, search=""))
    steps = {"teacher": ["teacher"], "teacher_again": ["teacher"], "tune": ["tune", "--trials", "3"],
             "tune_resumed": ["tune", "--trials", "5"], "best": ["best", "--json"],
             "report": ["report", "--seeds", "2"], "report_again": ["report", "--seeds", "2"]}
    done = {}
    for step, command in steps.items():
        done[step] = run_cli(*command, "--spec", str(spec), cwd=workdir)
        if step == "tune":  # what the first three trials were, before the resumed run adds to them
            done["first_three"] = [(t.params, t.value) for t in optuna.load_study(
                study_name="tiny", storage=f"sqlite:///{workdir}/studies/tiny/study.db").trials]
        if step == "report":
            done["first_report"] = json.loads((workdir / "studies/tiny/report.json").read_text())
    return workdir, spec, done


@contextmanager
def signal_handlers(handlers: dict):
    """Install `handlers` for the test and put back whatever the test process had: pytest started in the
    background of a non-interactive shell inherits SIGINT ignored, not Python's default handler."""
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# What a `tune` started from a terminal's foreground has.
FOREGROUND = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
