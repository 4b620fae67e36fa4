"""A new study is set up once: the creation race, take-over from a creator that died, the sampler seeds of
processes that join a running study, and a storage whose tables two processes create at once. (Several real
`tune` processes starting one study are in test_workers.py.)"""

import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing

import optuna
import pytest
import sqlalchemy.exc
from conftest import CPU_FP32

from kdtune import bands, data, storage, study, study_setup
from kdtune.models import TeacherCNN, n_parameters
from kdtune.spec import load_spec
from kdtune.student import Architecture

FAST_HEARTBEAT = "\n[workers]\nheartbeat_seconds = 1\ngrace_seconds = 2\n"


@pytest.fixture
def spec_and_splits(tiny_spec):
    spec = load_spec(tiny_spec("setup", width="[8, 1024]", extra=FAST_HEARTBEAT))
    return spec, data.prepare(spec.data, spec.seed)


def dead_worker() -> str:
    """The worker id of a process of this machine that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{ended.stdout.strip()}"


def n_control_arms(the_study):
    return sum("control" in t.user_attrs for t in the_study.get_trials())


@pytest.mark.parametrize("n_queued_before_death", [0, 1])
def test_a_starter_takes_over_at_once_from_a_creator_whose_process_is_gone(spec_and_splits, n_queued_before_death):
    """The creator was killed after creating the study, having queued none or one of the control arms: the next
    starter sets the study up at once, and the arms end up queued once each."""
    spec, splits = spec_and_splits
    the_study = optuna.create_study(storage=storage.open_storage(spec.storage_url), study_name=spec.name,
                                    direction="maximize")
    architecture = Architecture.of(spec.student, splits.input_shape, splits.n_classes)
    size_bands = bands.size_bands(spec.search, architecture, n_parameters(TeacherCNN(splits.input_shape, 10)))
    for config, control in study.control_arms(spec.search, spec.student.loss, size_bands)[:n_queued_before_death]:
        params = config.as_params()
        the_study.enqueue_trial(params, user_attrs={"control": control, "loss": params.pop("loss"),
                                                    "band": bands.band_of_width(size_bands, config.width).index})
    the_study.set_user_attr(study.SET_UP_BY_KEY, {"worker": dead_worker(), "beat": 3})
    cached = study_setup.set_up(study.open_study(spec, create=True), spec, splits, CPU_FP32, echo=lambda _: None)
    attrs = the_study.user_attrs
    assert attrs["teacher_cache_id"] == cached.cache_id and attrs[study.SET_UP_BY_KEY]["worker"] == study.WORKER_ID
    assert n_control_arms(the_study) == len(study.control_arms(spec.search, spec.student.loss, size_bands)) == 6


def test_a_starter_takes_over_from_a_silent_creator_elsewhere_after_the_grace_period(spec_and_splits):
    spec, splits = spec_and_splits
    the_study = study.open_study(spec, create=True)
    the_study.set_user_attr(study.SET_UP_BY_KEY, {"worker": "another-machine:1", "beat": 5})
    said = []
    study_setup.set_up(study.open_study(spec, create=True), spec, splits, CPU_FP32, echo=said.append)
    assert "being set up by another-machine:1" in said[0]
    assert the_study.user_attrs[study.SET_UP_BY_KEY]["worker"] == study.WORKER_ID
    assert "spec" in the_study.user_attrs


def test_a_study_created_by_another_process_meanwhile_is_joined_not_created_again(spec_and_splits, monkeypatch):
    """The study did not exist when this process looked, but another created it before this one could."""
    spec, _ = spec_and_splits
    creator = study.open_study(spec, create=True)
    creator.set_user_attr(study.SET_UP_BY_KEY, {"worker": "another-machine:1", "beat": 0})
    monkeypatch.setattr(optuna, "get_all_study_summaries", lambda *args, **kwargs: [])
    joined = study.open_study(spec, create=True)
    assert joined.user_attrs[study.SET_UP_BY_KEY]["worker"] == "another-machine:1"  # not claimed
    assert n_control_arms(joined) == 0  # the creator's set-up queues them, not a process that joins


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the trial is asked for by hand, as a worker's would be
def test_processes_joining_a_running_study_sample_from_their_own_seeds(spec_and_splits):
    spec, splits = spec_and_splits
    the_study = study.open_study(spec, create=True)
    study_setup.set_up(the_study, spec, splits, CPU_FP32, echo=lambda _: None)
    assert not study.joins_live_study(the_study)  # alone: the seed is the spec's, reproducible
    assert study.sampler_seed(spec.seed, 7, worker=1, joining=False) == spec.seed + 7 + study.WORKER_SEED_STRIDE
    assert study.sampler_seed(spec.seed, 7, worker=0, joining=True) != study.sampler_seed(spec.seed, 7, 0, False)

    running = the_study.ask()
    database = spec.storage_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as connection, connection:  # its worker's heartbeat, just now
        connection.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) SELECT trial_id, datetime('now') "
                           "FROM trials WHERE number = ?", (running.number,))
    assert study.joins_live_study(the_study)  # another worker runs a trial right now
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    assert not study.joins_live_study(the_study)  # its worker died: resuming alone stays reproducible


def test_a_lost_race_to_create_the_tables_is_retried(tmp_path, monkeypatch):
    real, calls = storage.SQLiteStorage, []  # what open_storage builds for a sqlite:/// URL

    def first_call_loses(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO version_info", {}, sqlite3.IntegrityError(
                "UNIQUE constraint failed: version_info.version_info_id"))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "SQLiteStorage", first_call_loses)
    assert isinstance(storage.open_storage(f"sqlite:///{tmp_path}/race.db"), real)
    assert len(calls) == 2


def test_an_unreachable_server_is_not_retried(monkeypatch):
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refused)
    with pytest.raises(storage.SpecError, match="cannot open storage"):
        storage.open_storage("postgresql://nobody@127.0.0.1:1/none")
    assert len(calls) == 1


def test_a_queued_trial_is_claimed_once_on_sqlite_while_another_process_claims_it(tmp_path):
    """Two processes popping the same queued trial: the one that waits for the other's write must then see the
    trial RUNNING and not claim it too (SQLite ignores SELECT ... FOR UPDATE; storage.SQLiteStorage takes the
    write lock before reading). The other process is a raw connection that has claimed it, uncommitted."""
    database = tmp_path / "claim.db"
    the_storage = storage.open_storage(f"sqlite:///{database}")
    the_study = optuna.create_study(storage=the_storage)
    the_study.enqueue_trial({"x": 1.0})
    trial_id = the_study.get_trials()[0]._trial_id
    with closing(sqlite3.connect(database, isolation_level=None)) as rival:
        rival.execute("BEGIN IMMEDIATE")
        rival.execute("UPDATE trials SET state = 'RUNNING' WHERE trial_id = ?", (trial_id,))
        claimed = []
        ours = threading.Thread(target=lambda: claimed.append(
            the_storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)))
        ours.start()
        time.sleep(1.0)  # lets our claim reach the database first; were it later, the test would only be weaker
        rival.execute("COMMIT")
        ours.join()
    assert claimed == [False]
