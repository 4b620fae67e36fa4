"""Setting a study up once, however many `tune` processes start it at the same moment, on however many machines.

The process that creates the study (the storage holds one study per name, so exactly one does) cuts the size
bands, queues the control arms, trains or loads the teacher, publishes it to the artifact store and records
what the study's numbers mean. Every other process waits until that record exists, then checks that it runs
the same spec on the same data and takes the study's teacher: no study ever trains two teachers or queues its
arms twice.

The setting-up process beats every `workers.heartbeat_seconds` in the study attribute `set_up_by`. A waiting
process takes the set-up over when the beats stop for `workers.grace_seconds` (or at once when the set-up
process is gone from this machine or was interrupted), so a study whose creator died is never stuck.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import optuna

from kdtune import artifacts, student, study, teacher
from kdtune.data import Splits
from kdtune.hardware import Compute
from kdtune.spec import Spec, SpecError
from kdtune.teacher import CachedTeacher

# How often a waiting process looks at the study again: one small query each time.
POLL_SECONDS = 1.0
_ABSENT = object()  # no set_up_by attribute yet


def set_up(the_study: optuna.Study, spec: Spec, splits: Splits, compute: Compute,
           echo: Callable[[str], None] = print) -> CachedTeacher:
    """The study's teacher, once the study is set up: by this process if it created the study (or takes over
    from a creator that died), else by waiting for the process that does."""
    waiting_since, last_beat, announced = None, None, None
    while "spec" not in (attrs := the_study.user_attrs):  # one query a look
        # absent: the study was created a moment ago and its creator has not said so yet
        set_up_by = attrs.get(study.SET_UP_BY_KEY, _ABSENT)
        if isinstance(set_up_by, dict) and set_up_by["worker"] == study.WORKER_ID:
            return _set_up_here(the_study, spec, splits, compute, echo)
        if isinstance(set_up_by, dict) and set_up_by["worker"] != announced:
            announced = set_up_by["worker"]
            echo(f"Study {spec.name!r} is being set up by {announced} (its teacher, its control arms): waiting.")
        if waiting_since is None or set_up_by != last_beat:
            waiting_since, last_beat = time.monotonic(), set_up_by
        if _gone(set_up_by) or time.monotonic() - waiting_since > spec.workers.grace_seconds:
            _claim(the_study)  # the next look, after a rival's claim could land too, tells who won
        time.sleep(POLL_SECONDS)
    return teacher_of(the_study, spec, splits, compute, echo)


def teacher_of(the_study: optuna.Study, spec: Spec, splits: Splits, compute: Compute,
               echo: Callable[[str], None] = print) -> CachedTeacher:
    """The teacher of a study already set up, on the data it was made on (refused otherwise)."""
    recorded = the_study.user_attrs.get("spec")
    if recorded is None:
        raise SpecError(f"study {spec.name!r} has not been set up yet (no teacher); run `kdtune tune` first.")
    study.check_same_spec(spec, recorded, the_study.user_attrs.get(study.RECORD_VERSION_KEY))
    check_same_data(the_study, spec, splits)
    check_same_students(the_study, spec, splits)
    return artifacts.teacher_for_study(the_study, spec, splits, compute, echo=echo)


def check_same_data(the_study: optuna.Study, spec: Spec, splits: Splits) -> None:
    """Refuse data whose contents changed since the study was made: its trials would mean something else."""
    recorded = the_study.user_attrs.get("data_fingerprint")
    if recorded is not None and recorded != splits.fingerprint:
        where = spec.data.path or f"the {spec.data.format} data"
        raise SpecError(f"study {spec.name!r} was made on other data: its fingerprint is {recorded[:16]}, but "
                        f"{where} now gives {splits.fingerprint[:16]}; restore that data, or start a new study "
                        "on this data with --study-name.")


def check_same_students(the_study: optuna.Study, spec: Spec, splits: Splits) -> None:
    """Refuse a user student family whose module changed since the study was made: the same name would build
    other students, and the study would mix them."""
    recorded = the_study.user_attrs.get(study.STUDENT_SOURCE_KEY)
    if recorded is not None and recorded != student.Architecture.of(
            spec.student, splits.input_shape, splits.n_classes).as_record().get("source_sha256"):
        raise SpecError(f"study {spec.name!r} was made with another version of {spec.student.family} (its module's "
                        "source changed); restore it, or start a new study with --study-name.")


def _set_up_here(the_study: optuna.Study, spec: Spec, splits: Splits, compute: Compute,
                 echo: Callable[[str], None]) -> CachedTeacher:
    with _beating(the_study, spec.workers.heartbeat_seconds):
        if artifacts.RECORD_KEY not in the_study.user_attrs \
                and not teacher.cache_folder(spec, splits.fingerprint, compute).exists():
            echo("No cached teacher for this data, teacher config and seed: training it first.")
        cached = artifacts.teacher_for_study(the_study, spec, splits, compute, echo=echo)
        # the bands need the teacher's size; the arms a creator that died did not queue
        architecture = student.Architecture.of(spec.student, splits.input_shape, splits.n_classes)
        size_bands = study.study_bands(the_study, spec, architecture, cached)
        study.enqueue_control_arms(the_study, spec.search, spec.student.loss, size_bands,
                                   student.runs_reference(spec.student))
        study.record(the_study, spec, splits, cached, compute)
    return cached


@contextmanager
def _beating(the_study: optuna.Study, interval_seconds: float) -> Iterator[None]:
    """Beat while the body sets the study up; an interrupted set-up says so at once (`set_up_by` = None)."""
    stopped = threading.Event()

    def beat() -> None:
        n_beats = 0
        while not stopped.wait(interval_seconds):
            n_beats += 1
            the_study.set_user_attr(study.SET_UP_BY_KEY, {"worker": study.WORKER_ID, "beat": n_beats})

    thread = threading.Thread(target=beat, name="kdtune-set-up-beat", daemon=True)
    thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stopped.set()
        thread.join()
        if not finished:
            the_study.set_user_attr(study.SET_UP_BY_KEY, None)


def _claim(the_study: optuna.Study) -> None:
    the_study.set_user_attr(study.SET_UP_BY_KEY, {"worker": study.WORKER_ID, "beat": 0})


def _gone(set_up_by: dict | object | None) -> bool:
    """The set-up process stopped (it said so), or it ran on this machine and its process no longer exists."""
    if set_up_by is None:
        return True
    if set_up_by is _ABSENT:
        return False
    host, _, pid = set_up_by["worker"].rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False
