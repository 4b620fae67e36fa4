"""Each private piece of Optuna that kdtune relies on, pinned: an Optuna release that moves one fails here."""

import sqlite3
from contextlib import closing

import optuna

from kdtune.optuna_compat import give_first_heartbeats, heartbeat, live_trial, stale_trial_numbers


def test_stale_trials_are_running_trials_whose_heartbeat_stopped(tmp_path):
    database = tmp_path / "s.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}", heartbeat_interval=1, grace_period=60)
    the_study = optuna.create_study(storage=storage)
    dead, alive = the_study.ask(), the_study.ask()
    with closing(sqlite3.connect(database)) as connection, connection:
        for trial, age in ((dead, "-1 hour"), (alive, "-1 second")):
            connection.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) SELECT trial_id, "
                               "datetime('now', ?) FROM trials WHERE number = ?", (age, trial.number))
    assert stale_trial_numbers(the_study) == {dead.number}
    assert {t.number for t in the_study.get_trials(states=(optuna.trial.TrialState.RUNNING,))} == {0, 1}  # untouched


def test_a_storage_without_heartbeats_has_no_stale_trials():
    the_study = optuna.create_study()
    the_study.ask()
    assert stale_trial_numbers(the_study) == set()


def test_a_live_handle_on_a_finished_trial_reads_it():
    the_study = optuna.create_study()
    the_study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    finished = the_study.trials[1]
    handle = live_trial(the_study, finished)
    assert handle.number == 1 and handle.params == finished.params


def test_optuna_logs_failed_trials_on_the_trial_loop_logger(trial_log):
    def fail(trial):
        raise ValueError("expected")

    optuna.create_study().optimize(fail, n_trials=1, catch=(ValueError,))
    failed = [r for r in trial_log if r.exc_info]
    assert failed and isinstance(failed[0].exc_info[1], ValueError)


def heartbeats(database) -> list[tuple[int, int]]:
    with closing(sqlite3.connect(database)) as connection:
        return connection.execute("SELECT t.number, count(*) FROM trial_heartbeats h JOIN trials t "
                                  "ON t.trial_id = h.trial_id GROUP BY t.number").fetchall()


def test_a_running_trial_without_a_heartbeat_gets_one_and_can_then_go_stale(tmp_path):
    """Optuna never calls a running trial without a heartbeat stale: a worker that died before its first beat
    would hold its place for good. Given a first beat, it goes stale like any other once the beats stop."""
    database = tmp_path / "s.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}", heartbeat_interval=1, grace_period=60)
    the_study = optuna.create_study(storage=storage)
    orphan = the_study.ask()  # ask() writes no heartbeat: the optimize loop's thread does, a moment later
    assert heartbeats(database) == [] and stale_trial_numbers(the_study) == set()
    give_first_heartbeats(the_study)
    give_first_heartbeats(the_study)  # a trial that has a beat keeps it: one row, not two
    assert heartbeats(database) == [(orphan.number, 1)]
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    assert stale_trial_numbers(the_study) == {orphan.number}


def test_first_heartbeats_leave_a_storage_without_heartbeats_alone():
    the_study = optuna.create_study()
    the_study.ask()
    give_first_heartbeats(the_study)
    assert stale_trial_numbers(the_study) == set()


def test_a_trial_asked_beside_the_loop_s_own_beats_while_its_heartbeat_runs(tmp_path):
    """A batch mate (kdtune.study) is asked, not run by Optuna's loop: its heartbeat is kdtune's to start."""
    database = tmp_path / "s.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}", heartbeat_interval=1, grace_period=60)
    the_study = optuna.create_study(storage=storage)
    mate = the_study.ask()
    with heartbeat(the_study, mate):
        pass  # the thread beats once as it starts
    assert heartbeats(database) == [(mate.number, 1)]


def test_a_storage_without_heartbeats_gives_a_heartbeat_that_does_nothing():
    the_study = optuna.create_study()
    with heartbeat(the_study, the_study.ask()):
        pass
