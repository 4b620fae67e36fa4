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
import time
from contextlib import closing

import optuna
import postgres
import pytest
import torch
from conftest import REPO, run_cli
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdtune import artifacts, data, study, teacher
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
    trials = load_study(storage_url, "pair").get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == 8
    assert len({t.number for t in trials}) == len(trials)
    assert {t.user_attrs["worker"] for t in trials if t.state in FINISHED}.__len__() == 2  # both worked
    assert all("fail_reason" in t.user_attrs for t in trials if t.state == TrialState.FAIL)  # surplus, or chance


def test_a_killed_worker_s_trial_is_failed_and_retried(tiny_spec, workdir, storage_url):
    spec = str(tiny_spec("killed", width="[256, 512]", student_epochs=30, pruner="none", extra=FAST_HEARTBEAT))
    assert run_cli("teacher", "--spec", spec, cwd=workdir).returncode == 0
    tune = start_tune(workdir, spec, "--trials", "8", "--jobs", "2", "--storage", storage_url)
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline and tune.poll() is None:
        time.sleep(0.2)
        running = running_workers(storage_url, "killed")
        if len(set(running.values())) == 2:  # both workers are training: kill one mid-trial
            victim = min(running)
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
    assert len([t for t in trials if t.state in FINISHED]) == 8
    assert all(next(t for t in trials if t.number == n).value == v for n, v in finished_before.items())


def test_a_database_restart_mid_run_loses_no_finished_trial(tiny_spec, workdir, postgres_server):
    spec = str(tiny_spec("restart", width="[128, 256]", student_epochs=10, pruner="none", extra=FAST_HEARTBEAT))
    assert run_cli("teacher", "--spec", spec, cwd=workdir).returncode == 0
    url = postgres_server.url
    tune = start_tune(workdir, spec, "--trials", "30", "--storage", url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(load_or_none(url, "restart")) < 2:
        time.sleep(0.5)
    postgres_server.stop()
    time.sleep(2)
    postgres_server.start()
    _, stderr = tune.communicate(timeout=300)
    finished_after = load_or_none(url, "restart")
    assert tune.returncode in (0, 2), stderr[-2000:]
    if tune.returncode == 2:  # it did not recover: one line that names the storage, no traceback
        assert "Traceback" not in stderr and "error: " in stderr and "storage" in stderr.lower()
    assert len(finished_after) >= 2


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
    # a worker killed mid-trial: a running trial whose heartbeat stopped
    study = load_study(f"sqlite:///{workdir}/studies/seen/study.db", "seen")
    storage = optuna.storages.RDBStorage(f"sqlite:///{workdir}/studies/seen/study.db", heartbeat_interval=1,
                                         grace_period=3)
    dead = study.ask()
    storage.record_heartbeat(dead._trial_id)
    time.sleep(4)
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
    cached = artifacts.teacher_for_study(the_study, spec, splits, echo=lambda _: None)
    return spec, splits, the_study, cached


def refuse_training(*args, **kwargs):
    raise AssertionError("a second teacher was trained for the study")


def test_a_worker_without_the_cache_fetches_the_study_s_teacher(tiny_spec, workdir, monkeypatch):
    spec, splits, the_study, cached = tuned_once(tiny_spec, workdir, "travel")
    shutil.rmtree(cached.folder)  # another machine: no cache folder
    monkeypatch.setattr(teacher, "train", refuse_training)
    fetched = artifacts.teacher_for_study(study.open_study(spec, create=False), spec, splits, echo=lambda _: None)
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
        artifacts.teacher_for_study(study.open_study(spec, create=False), spec, splits, echo=lambda _: None)
    assert not cached.folder.exists()  # nothing half-fetched is left to be mistaken for a cache
