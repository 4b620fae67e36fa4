"""Several workers on one study: the target is met exactly, a killed worker's trial is failed and retried,
finished trials survive, `status` says what is running, stale and waiting, and the teacher travels with the
study through its artifact store."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing

import optuna
import postgres
import pytest
import sqlalchemy.exc
import torch
from conftest import CPU_FP32, REPO, run_cli
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdtune import artifacts, data, study, teacher, workers
from kdtune.spec import SpecError, load_spec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
FAST_HEARTBEAT = "\n[workers]\nheartbeat_seconds = 1\ngrace_seconds = 3\n"


def load_study(url, name):
    return optuna.load_study(study_name=name, storage=url)


def running_workers(url, name):
    """{trial number: worker pid} of running trials, read while `tune` runs."""
    if url.startswith("sqlite:///"):  # read-only SQL: opening it with Optuna while tune creates it races the schema
        try:
            with closing(sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)) as connection:
                rows = connection.execute(
                    "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = "
                    "t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'worker'").fetchall()
        except sqlite3.OperationalError:
            return {}
        return {number: int(json.loads(value).rsplit(":", 1)[1]) for number, value in rows}
    try:  # the server's schema exists already (the fixture made it)
        trials = load_study(url, name).get_trials(states=(TrialState.RUNNING,))
    except KeyError:
        return {}
    return {t.number: int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials if "worker" in t.user_attrs}


def watch_running(url, name, tune, pick):
    """What `pick` finds in the running trials ({trial number: worker pid}), polled while `tune` runs, for up to
    two minutes; None if it never found anything."""
    deadline, found = time.monotonic() + 120, None
    while found is None and time.monotonic() < deadline and tune.poll() is None:
        time.sleep(0.2)
        found = pick(running_workers(url, name))
    return found


@pytest.fixture(scope="module")
def postgres_server():
    binaries = postgres.server_binaries()
    if binaries is None:
        if os.environ.get("KDTUNE_REQUIRE_POSTGRES"):
            pytest.fail("KDTUNE_REQUIRE_POSTGRES is set but PostgreSQL is not installed")
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    server = postgres.Server(binaries)
    optuna.storages.RDBStorage(server.url)  # create the schema once, before any worker races to
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, workdir):
    if request.param == "sqlite":
        return f"sqlite:///{workdir}/shared.db"
    return request.getfixturevalue("postgres_server").url


def test_two_workers_meet_the_target_exactly(tiny_spec, workdir, storage_url):
    spec = str(tiny_spec("pair", extra=FAST_HEARTBEAT))
    done = run_cli("tune", "--spec", spec, "--trials", "8", "--jobs", "2", "--storage", storage_url, cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr  # nor for the surplus trials that end a run with workers
    trials = load_study(storage_url, "pair").get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == 8
    assert len({t.number for t in trials}) == len(trials)
    assert {t.user_attrs["worker"] for t in trials if t.state in FINISHED}.__len__() == 2  # both worked
    assert all("fail_reason" in t.user_attrs for t in trials if t.state == TrialState.FAIL)  # surplus, or chance


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_simultaneous_starters_set_the_study_up_once(tiny_spec, workdir, backend, request):
    """Three `tune` processes started at once on a new study, with no teacher cached and (PostgreSQL) no
    tables yet: one creates it, queues the control arms and trains the teacher; the others wait for it."""
    url = (f"sqlite:///{workdir}/new.db" if backend == "sqlite"
           else request.getfixturevalue("postgres_server").new_database("simultaneous"))
    spec = str(tiny_spec("together", width="[8, 1024]", extra=FAST_HEARTBEAT))
    starters = [start_tune(workdir, spec, "--trials", "9", "--storage", url) for _ in range(3)]
    outputs = [starter.communicate(timeout=300) for starter in starters]
    for starter, (stdout, stderr) in zip(starters, outputs):
        assert starter.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stdout + stderr
    assert sum(stdout.count("Training the teacher") for stdout, _ in outputs) == 1
    trials = load_study(url, "together").get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == 9
    controls = sorted((t.user_attrs["control"], t.params["width"]) for t in trials if "control" in t.user_attrs)
    # one no-distillation arm at each of the five size bands' middle width
    assert controls == [("no_distillation", w) for w in (10, 22, 69, 218, 622)] + [("reference", 512)]
    assert len(list((workdir / "studies/together/artifacts").iterdir())) == 5  # one teacher's files
    assert len(list((workdir / "studies/.teacher-cache").iterdir())) == 1


def test_a_killed_worker_s_trial_is_failed_and_retried(tiny_spec, workdir, storage_url):
    spec = str(tiny_spec("killed", width="[256, 512]", student_epochs=30, pruner="none", extra=FAST_HEARTBEAT))
    assert run_cli("teacher", "--spec", spec, cwd=workdir).returncode == 0
    # 12 trials: enough that both workers train together for seconds even when one starts late on a fast host
    tune = start_tune(workdir, spec, "--trials", "12", "--jobs", "2", "--storage", storage_url)
    # both workers are training: kill one mid-trial
    victim = watch_running(storage_url, "killed", tune, lambda running: min(running)
                           if len(set(running.values())) == 2 else None)
    assert victim is not None, "the two workers never trained at the same time"
    finished_before = {t.number: t.value for t in load_study(storage_url, "killed").get_trials(states=FINISHED)}
    os.kill(running_workers(storage_url, "killed")[victim], signal.SIGKILL)
    _, stderr = tune.communicate(timeout=300)

    assert tune.returncode == 0, stderr[-2000:]
    assert "ended with signal SIGKILL" in stderr
    trials = load_study(storage_url, "killed").get_trials()
    assert next(t for t in trials if t.number == victim).state == TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim]
    assert retries and retries[0].state in FINISHED
    assert retries[0].params == next(t for t in trials if t.number == victim).params
    assert len([t for t in trials if t.state in FINISHED]) == 12
    assert all(next(t for t in trials if t.number == n).value == v for n, v in finished_before.items())


def test_a_killed_worker_s_batched_trials_are_each_failed_and_retried(tiny_spec, workdir):
    """Narrow students train several trials at once: killing their worker leaves every one of those trials
    stale, and each is failed and retried like a trial trained alone."""
    url = f"sqlite:///{workdir}/shared.db"
    spec = tiny_spec("batches", width="[8, 64]", student_epochs=40, pruner="none",
                     search='bands = "none"\ncontrol_arms = false', extra=FAST_HEARTBEAT)
    spec.write_text("batch_students = 8\n" + spec.read_text())
    spec = str(spec)
    assert run_cli("teacher", "--spec", spec, cwd=workdir).returncode == 0
    tune = start_tune(workdir, spec, "--trials", "12", "--jobs", "2", "--storage", url)

    def a_worker_training_a_batch(running):
        batches = {pid: [n for n, p in running.items() if p == pid] for pid in set(running.values())}
        if len(batches) == 2 and max(len(numbers) for numbers in batches.values()) >= 2:
            candidate = max(batches, key=lambda pid: len(batches[pid]))
            trials = load_study(url, "batches").get_trials(states=(TrialState.RUNNING,))
            if all("trained_with" in t.user_attrs for t in trials if t.number in batches[candidate]):
                return candidate  # its batch is training: kill it mid-batch
        return None

    victim = watch_running(url, "batches", tune, a_worker_training_a_batch)
    assert victim is not None, "the two workers never trained at the same time, one of them a batch"
    os.kill(victim, signal.SIGKILL)
    killed = sorted(n for n, pid in running_workers(url, "batches").items() if pid == victim)
    _, stderr = tune.communicate(timeout=300)

    assert tune.returncode == 0, stderr[-2000:]
    trials = {t.number: t for t in load_study(url, "batches").get_trials()}
    assert len(killed) >= 2 and all(trials[n].user_attrs["trained_with"] == killed for n in killed)
    for number in killed:
        assert trials[number].state == TrialState.FAIL
        retries = [t for t in trials.values() if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]
        assert len(retries) == 1 and retries[0].state in FINISHED and retries[0].params == trials[number].params
    assert len([t for t in trials.values() if t.state in FINISHED]) == 12


def test_a_database_restart_mid_run_loses_no_finished_trial(tiny_spec, workdir, postgres_server):
    """The server goes away and comes back mid-run: `tune` recovers or stops with one line (which of the two
    depends on what it was doing at that instant), every trial finished before stays as it was, and the same
    command then completes the study to its exact target."""
    spec = str(tiny_spec("restart", width="[128, 256]", student_epochs=10, pruner="none", extra=FAST_HEARTBEAT))
    assert run_cli("teacher", "--spec", spec, cwd=workdir).returncode == 0
    url = postgres_server.url
    tune = start_tune(workdir, spec, "--trials", "30", "--storage", url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(load_or_none(url, "restart")) < 2:
        time.sleep(0.5)
    finished_before = {t.number: t.value for t in load_or_none(url, "restart")}
    assert len(finished_before) >= 2, "tune finished no trial in 120 s"
    postgres_server.stop()
    postgres_server.start()
    _, stderr = tune.communicate(timeout=300)
    assert tune.returncode in (0, 2), stderr[-2000:]
    assert "Traceback" not in stderr
    if tune.returncode == 2:  # it did not recover: one line that names the storage
        assert "error: " in stderr and "storage" in stderr.lower()
    resumed = run_cli("tune", "--spec", spec, "--trials", "30", "--storage", url, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished_after = {t.number: t.value for t in load_or_none(url, "restart")}
    assert len(finished_after) == 30
    assert all(finished_after[number] == value for number, value in finished_before.items())


def test_a_storage_error_in_a_background_thread_is_one_line(monkeypatch, capsys):
    """Optuna's heartbeat thread dies with the storage error when the database goes away mid-trial."""
    monkeypatch.setattr(threading, "excepthook", workers.one_line_thread_error)

    def lose_the_database():
        raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed the connection"))

    thread = threading.Thread(target=lose_the_database, name="heartbeat")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "heartbeat stopped: the study storage failed (server closed the connection)" in err


def load_or_none(url, name):
    try:
        return load_study(url, name).get_trials(states=FINISHED)
    except KeyError:
        return []


def start_tune(workdir, spec, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), "tune", "--spec", spec, *args], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_status_lists_trials_by_state_and_the_retries(tiny_spec, workdir):
    spec = str(tiny_spec("seen", extra=FAST_HEARTBEAT))
    assert run_cli("tune", "--spec", spec, "--trials", "3", cwd=workdir).returncode == 0
    # a worker killed mid-trial: a running trial whose last heartbeat is long past the grace period
    dead = load_study(f"sqlite:///{workdir}/studies/seen/study.db", "seen").ask()
    with closing(sqlite3.connect(workdir / "studies/seen/study.db")) as connection, connection:
        connection.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) SELECT trial_id, "
                           "datetime('now', '-1 hour') FROM trials WHERE number = ?", (dead.number,))
    shown = run_cli("status", "--spec", spec, "--json", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["counts"]["stale"] == 1 and status["counts"]["running"] == 0
    assert status["counts"]["complete"] + status["counts"]["pruned"] == 3
    assert status["running"][0]["trial"] == dead.number and status["running"][0]["stale"]
    text = run_cli("status", "--spec", spec, cwd=workdir)
    assert f"trial {dead.number}: stale" in text.stdout


def tuned_once(tiny_spec, workdir, name):
    spec = load_spec(tiny_spec(name))
    splits = data.prepare(spec.data, spec.seed)
    the_study = study.open_study(spec, create=True)
    cached = artifacts.teacher_for_study(the_study, spec, splits, CPU_FP32, echo=lambda _: None)
    return spec, splits, the_study, cached


def refuse_training(*args, **kwargs):
    raise AssertionError("a second teacher was trained for the study")


def test_a_worker_without_the_cache_fetches_the_study_s_teacher(tiny_spec, workdir, monkeypatch):
    spec, splits, the_study, cached = tuned_once(tiny_spec, workdir, "travel")
    shutil.rmtree(cached.folder)  # another machine: no cache folder
    monkeypatch.setattr(teacher, "train", refuse_training)
    fetched = artifacts.teacher_for_study(study.open_study(spec, create=False), spec, splits, CPU_FP32,
                                          echo=lambda _: None)
    assert fetched.cache_id == cached.cache_id
    assert all(torch.equal(fetched.logits[part], cached.logits[part]) for part in ("train", "val", "test"))


def test_a_tampered_teacher_artifact_is_refused(tiny_spec, workdir, monkeypatch):
    spec, splits, the_study, cached = tuned_once(tiny_spec, workdir, "tampered")
    weights_id = the_study.user_attrs[artifacts.RECORD_KEY]["files"]["weights.pt"]["artifact_id"]
    stored = spec.output_dir / "artifacts" / weights_id
    tampered = bytearray(stored.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    stored.write_bytes(bytes(tampered))
    shutil.rmtree(cached.folder)
    monkeypatch.setattr(teacher, "train", refuse_training)
    with pytest.raises(SpecError, match="weights.pt .* does not match the sha256 recorded in the study"):
        artifacts.teacher_for_study(study.open_study(spec, create=False), spec, splits, CPU_FP32,
                                    echo=lambda _: None)
    assert not cached.folder.exists()  # nothing half-fetched is left to be mistaken for a cache
