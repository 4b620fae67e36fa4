"""End to end through `python cli.py` in subprocesses, as a user runs it, on a tiny slice of real data."""

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import optuna
import pytest
from conftest import REPO, cli_in_process, run_cli

from kdtune.cli import COMMANDS, main

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
    # the front: each of the tiny study's three size bands, with its best trial
    assert [entry["band"] for entry in found["front"]] == [0, 1, 2]
    for entry in found["front"]:
        in_band = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                   if t.user_attrs["band"] == entry["band"]]
        assert entry["val_accuracy"] == max(t.value for t in in_band)
        assert entry["min_params"] <= entry["n_parameters"] <= entry["max_params"]

    report = done["first_report"]
    assert set(report["rows"]) == {"tuned", "no_distillation", "reference"}
    assert report["rows"]["no_distillation"]["config"]["lambda"] == 1.0
    assert report["rows"]["reference"]["n_parameters"] == 784 * 512 + 512 + 512 * 10 + 10
    assert len(report["gain"]["paired_differences"]) == 2
    assert "Verdict" in (workdir / "studies/tiny/report.md").read_text()
    # the second report, as after an interruption, resumes from the students the first one kept
    # each band's candidates and twin, and the reference
    assert done["report_again"].stdout.count("(2 of 2 from an earlier report)") == len(report["candidates"]) + len(
        report["front"]) + 1
    assert json.loads((workdir / "studies/tiny/report.json").read_text())["rows"] == report["rows"]


def test_a_run_built_to_prune_prunes(tiny_spec, workdir):
    """Widths down to 1 unit make weak trials that the median pruner must stop early, within their size band."""
    spec = str(tiny_spec("prune", width="[1, 128]", n_startup_trials=2, student_epochs=4, search="bands = [10000]"))
    tuned = cli_in_process("tune", "--spec", spec, "--trials", "12", cwd=workdir)
    assert tuned.returncode == 0, tuned.stderr
    pruned = load_study(workdir, "prune").get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned and all(len(t.intermediate_values) < 4 for t in pruned)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_keeps_finished_trials_and_says_how_to_resume(tiny_spec, workdir, stop):
    spec = str(tiny_spec("sigint", width="[256, 512]", student_epochs=30, pruner="none"))
    process = start_cli(workdir, "tune", "--spec", spec, "--trials", "50")
    wait_until(lambda: n_finished_so_far(workdir, "sigint") >= 2, "two trials finished")
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


def start_cli(workdir, *args):
    """`python cli.py ...` in the background, stoppable with Ctrl-C even when pytest itself runs as a background
    job (started with SIGINT ignored, which its children would inherit)."""
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for: {what}"
        time.sleep(0.2)


def study_attr(workdir, name, key):
    """A study user attribute read-only (None until it exists), while `tune` may be creating the database."""
    database = workdir / "studies" / name / "study.db"
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            row = connection.execute("SELECT value_json FROM study_user_attributes WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    return None if row is None else json.loads(row[0])


def test_interrupted_while_the_teacher_trains_says_how_to_resume(tiny_spec, workdir):
    spec = tiny_spec("early", extra="\n[workers]\nheartbeat_seconds = 1\ngrace_seconds = 3\n")
    spec.write_text(spec.read_text().replace("[teacher]\nmax_epochs = 2\n",
                                             "[teacher]\nmax_epochs = 1000\npatience_epochs = 1000\n"))
    process = start_cli(workdir, "tune", "--spec", str(spec), "--trials", "5")
    # the set-up beats while the teacher (of 1,000 epochs) trains
    wait_until(lambda: (study_attr(workdir, "early", "set_up_by") or {}).get("beat", 0) >= 1, "the teacher trains")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert f"Resume with: kdtune tune --spec {spec} --trials 5" in stderr and "Traceback" not in stderr
    assert study_attr(workdir, "early", "set_up_by") is None  # the next start takes the set-up over at once


def test_resuming_on_changed_data_is_refused_and_new_data_gets_its_own_teacher(tiny_spec, workdir):
    """The data file replaced at the same path, one pixel changed: the study refuses to go on (exit 2, both
    fingerprints named), keeps its trials, and a new study on the new data trains a teacher of its own."""
    import numpy as np
    spec = str(tiny_spec("moved"))
    assert cli_in_process("tune", "--spec", spec, "--trials", "2", cwd=workdir).returncode == 0
    with np.load(workdir / "tiny.npz") as archive:
        arrays = dict(archive)
    arrays["x_train"][0, 0, 0] ^= 1
    np.savez(workdir / "tiny.npz", **arrays)
    resumed = cli_in_process("tune", "--spec", spec, "--trials", "4", cwd=workdir)
    assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr
    old = load_study(workdir, "moved")
    recorded = old.user_attrs["data_fingerprint"]
    assert "was made on other data" in resumed.stderr and recorded[:16] in resumed.stderr
    assert "--study-name" in resumed.stderr
    assert len(old.get_trials(states=FINISHED)) == 2
    fresh = cli_in_process("tune", "--spec", spec, "--study-name", "moved2", "--trials", "1", cwd=workdir)
    assert fresh.returncode == 0, fresh.stderr
    assert "Training the teacher" in fresh.stdout
    new = load_study(workdir, "moved2").user_attrs
    assert new["data_fingerprint"] != recorded and new["data_fingerprint"][:16] in resumed.stderr
    assert new["teacher_cache_id"] != old.user_attrs["teacher_cache_id"]


@pytest.mark.parametrize("command", ["best", "status", "report", "dashboard"])
def test_commands_on_a_missing_study_leave_no_database_behind(command, workdir, capsys):
    (workdir / "none.toml").write_text("")
    assert main([command, "--spec", "none.toml"]) == 2
    assert "no study named 'none'" in capsys.readouterr().err
    assert not (workdir / "studies").exists()
    # the empty study.db an earlier kdtune left behind in the same case is no study either, and stays empty
    (workdir / "studies/none").mkdir(parents=True)
    (workdir / "studies/none/study.db").touch()
    assert main([command, "--spec", "none.toml"]) == 2
    assert "no study named 'none'" in capsys.readouterr().err
    assert (workdir / "studies/none/study.db").stat().st_size == 0


def test_best_and_status_read_a_study_they_may_not_write(tiny_study):
    """A study.db the user may only read, in a folder they may not write either (both made immutable, which
    binds root too: SQLite can then make no shared-memory file beside the database)."""
    workdir, spec, done = tiny_study
    folder = workdir / "studies/tiny"
    locked = [folder / "study.db", folder]
    if subprocess.run(["chattr", "+i", *map(str, locked)], capture_output=True).returncode != 0:
        pytest.skip("cannot make the study read-only here (chattr +i)")
    try:
        shown = {command: cli_in_process(command, "--spec", str(spec), "--json", cwd=workdir)
                 for command in ("best", "status")}
    finally:
        subprocess.run(["chattr", "-i", *map(str, locked)], check=True)
    assert all(result.returncode == 0 for result in shown.values()), [r.stderr for r in shown.values()]
    assert json.loads(shown["best"].stdout) == json.loads(done["best"].stdout)
    assert json.loads(shown["status"].stdout)["counts"]["complete"] >= 1


def test_help_summarises_each_command_in_whole_sentences(capsys):
    assert exit_code(["--help"]) == 0
    # an entry is "    name   summary", its summary wrapped onto lines indented further
    summaries = dict(re.findall(r"^    (\w+) +(.*(?:\n {6,}\S.*)*)", capsys.readouterr().out, re.MULTILINE))
    assert set(summaries) >= set(COMMANDS)
    for name in COMMANDS:
        assert summaries[name].endswith("."), (name, summaries[name])


BAD_SPECS = {
    "unknown key": ("[student]\nepochs = 3\n", "unknown key student.epochs"),
    "wrong type": ("seed = 'zero'\n", "seed must be int"),
    "bad range": ("[search]\nwidth = [64, 8]\n", "search.width must satisfy"),
    "bad loss": ("[student]\nloss = 'kl'\n", "student.loss must be one of"),
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


@pytest.mark.parametrize("command", ["tune", "best"])
def test_a_password_in_the_storage_url_is_masked_in_the_error(command, workdir, capsys):
    (workdir / "ok.toml").write_text("")
    assert main([command, "--spec", "ok.toml", "--storage", "postgresql://kdtune:s3cr@t@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage 'postgresql://kdtune:***@127.0.0.1:1/none'" in err, err
    assert "s3cr" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text, shown", [
    ("postgresql+psycopg2://kdtune:pw@db.example:5432/studies", "postgresql+psycopg2://kdtune:***@db.example:5432/studies"),
    ("mysql://root:a:b/c@host/db (no route)", "mysql://root:***@host/db (no route)"),  # ":" and "/" in the password
    ("'postgresql://kdtune:p@ss@host/db' (refused)", "'postgresql://kdtune:***@host/db' (refused)"),  # "@" unescaped
    ("postgresql://host/db?user=kdtune&password=pw&sslmode=require",
     "postgresql://host/db?user=kdtune&password=***&sslmode=require"),
    ("postgresql://kdtune@host/db", "postgresql://kdtune@host/db"),  # no password: nothing to hide
    ("sqlite:///studies/tiny/study.db", "sqlite:///studies/tiny/study.db"),
])
def test_storage_passwords_are_hidden_wherever_a_url_stands_in_a_message(text, shown):
    from kdtune.storage import hide_passwords

    assert hide_passwords(f"cannot open {text}; check it") == f"cannot open {shown}; check it"


@pytest.mark.parametrize("argv, message", [
    (["tune", "--trials", "-3"], "expected a positive int"),
    (["tune", "--timeout", "soon"], "expected a positive float"),
    (["tune", "--timeout", "nan"], "expected a positive float"),
    (["tune", "--timeout", "inf"], "expected a positive float"),
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
                                    "batch_size, depth, family, learning_rate, loss, lr_schedule, max_epochs, "
                                    "patience_epochs.")
    debug = run_cli("teacher", "--spec", "bad.toml", "--debug", cwd=workdir)
    assert "Traceback" in debug.stderr
