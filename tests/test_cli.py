"""End to end through `python cli.py` in subprocesses, as a user runs it, on a tiny slice of real data."""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import optuna
import pytest
from conftest import REPO, run_cli

from kdtune.cli import main

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def load_study(workdir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}/study.db")


def n_finished_so_far(workdir, name):
    """Count finished trials read-only: opening the database with Optuna while `tune` creates it would race
    it to create the schema."""
    database = workdir / "studies" / name / "study.db"
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_teacher_tune_resume_best_report(tiny_study):
    workdir, _, done = tiny_study
    for step, result in done.items():
        if hasattr(result, "returncode"):
            assert result.returncode == 0, (step, result.stderr)
    assert "Training the teacher" in done["teacher"].stdout
    assert "Training" not in done["teacher_again"].stdout and "validation accuracy" in done["teacher_again"].stdout

    assert "Browse: kdtune dashboard --spec" in done["tune"].stdout
    assert len(done["first_three"]) == 3
    assert "3 finished trials, running to 5" in done["tune_resumed"].stdout
    study = load_study(workdir, "tiny")
    assert len(study.get_trials(states=FINISHED)) == 5
    assert all(set(t.params) == {"temperature", "lambda", "width"} and t.intermediate_values for t in study.trials)
    assert [(t.params, t.value) for t in study.trials[:3]] == done["first_three"]

    found = json.loads(done["best"].stdout)
    assert found["val_accuracy"] == study.best_value and found["trial"] == study.best_trial.number

    report = done["first_report"]
    assert set(report["rows"]) == {"tuned", "no_distillation", "reference"}
    assert report["rows"]["no_distillation"]["config"]["lambda"] == 1.0
    assert report["rows"]["reference"]["n_parameters"] == 784 * 512 + 512 + 512 * 10 + 10
    assert len(report["gain"]["paired_differences"]) == 2
    assert "Verdict" in (workdir / "studies/tiny/report.md").read_text()
    # the second report, as after an interruption, resumes from the students the first one kept
    assert done["report_again"].stdout.count("(2 of 2 from an earlier report)") == 5 + 2
    assert json.loads((workdir / "studies/tiny/report.json").read_text())["rows"] == report["rows"]


def test_a_run_built_to_prune_prunes(tiny_spec, workdir):
    """Widths down to 1 unit make weak trials that the median pruner must stop early."""
    spec = str(tiny_spec("prune", width="[1, 128]", n_startup_trials=2, student_epochs=4))
    tuned = run_cli("tune", "--spec", spec, "--trials", "10", cwd=workdir)
    assert tuned.returncode == 0, tuned.stderr
    pruned = load_study(workdir, "prune").get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned and all(len(t.intermediate_values) < 4 for t in pruned)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_keeps_finished_trials_and_says_how_to_resume(tiny_spec, workdir, stop):
    spec = str(tiny_spec("sigint", width="[256, 512]", student_epochs=30, pruner="none"))
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "tune", "--spec", spec, "--trials", "50"],
                               cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(1)
        if n_finished_so_far(workdir, "sigint") >= 2:
            break
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Resume with: kdtune tune --spec" in stderr and "Traceback" not in stdout + stderr
    study = load_study(workdir, "sigint")
    n_finished = len(study.get_trials(states=FINISHED))
    assert n_finished >= 2
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    resumed = run_cli("tune", "--spec", spec, "--trials", str(n_finished + 1), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert len(load_study(workdir, "sigint").get_trials(states=FINISHED)) == n_finished + 1


BAD_SPECS = {
    "unknown key": ("[student]\nepochs = 3\n", "unknown key student.epochs"),
    "wrong type": ("seed = 'zero'\n", "seed must be int"),
    "bad range": ("[search]\nwidth = [64, 8]\n", "search.width must satisfy"),
    "bad loss": ("[student]\nloss = 'mse'\n", "student.loss must be one of"),
    "not toml": ("[data\n", "not valid TOML"),
    "missing data file": ("[data]\nformat = 'npz'\npath = 'nowhere.npz'\n", "nowhere.npz does not exist"),
    "missing idx folder": ("[data]\nformat = 'idx'\npath = 'no-folder'\n", "no-folder does not exist"),
    "malformed npz": ("[data]\nformat = 'npz'\npath = 'garbage.npz'\n", "garbage.npz"),
    "wrong shape": ("[data]\nformat = 'npz'\npath = 'flat.npz'\n", "(N, H, W)"),
    "unreachable storage": ("storage = 'postgresql://nobody@127.0.0.1:1/none'\n", "cannot open storage"),
    "unwritable output": ("storage = 'sqlite:////proc/kdtune/study.db'\n", "cannot create /proc/kdtune"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_input_is_one_line_and_exit_2(case, workdir, capsys):
    import numpy as np
    (workdir / "garbage.npz").write_bytes(b"this is not a zip archive")
    np.savez(workdir / "flat.npz", x_train=np.zeros((4, 784), np.uint8), y_train=np.arange(4),
             x_test=np.zeros((4, 784), np.uint8), y_test=np.arange(4))
    text, message = BAD_SPECS[case]
    (workdir / "bad.toml").write_text(text)
    assert main(["tune", "--spec", "bad.toml", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["tune", "--trials", "-3"], "expected a positive int"),
    (["tune", "--timeout", "soon"], "expected a positive float"),
    (["tune", "--jobs", "0"], "argument --jobs: expected a positive int"),
    (["teacher", "--spec", "missing.toml"], "missing.toml does not exist"),
    (["best", "--spec", "ok.toml"], "no study named 'ok'"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, workdir, capsys):
    (workdir / "ok.toml").write_text("")
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def exit_code(argv):
    """main()'s exit code, whether a command returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_errors_show_no_traceback_unless_debug(workdir):
    (workdir / "bad.toml").write_text("[student]\nepochs = 3\n")
    plain = run_cli("teacher", "--spec", "bad.toml", cwd=workdir)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == ("kdtune teacher: error: unknown key student.epochs; known keys here: "
                                    "batch_size, learning_rate, loss, max_epochs, patience_epochs.")
    debug = run_cli("teacher", "--spec", "bad.toml", "--debug", cwd=workdir)
    assert "Traceback" in debug.stderr
