"""The cached teacher travels with its study, through Optuna's artifact store.

The first `tune` of a study publishes the teacher's cache files as study artifacts and records their sha256
in the study itself. A worker on another machine that lacks the cache downloads them and checks them against
that record before use, so no study ever has two teachers, and a tampered or truncated artifact is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from kdtune import teacher
from kdtune.data import Splits
from kdtune.hardware import Compute
from kdtune.provenance import sha256_file
from kdtune.spec import Spec, SpecError
from kdtune.teacher import CachedTeacher

RECORD_KEY = "teacher_artifacts"  # study user attribute: {"cache_id", "files": {name: {artifact_id, sha256}}}


def open_artifact_store(spec: Spec):
    """`artifacts = "s3://bucket"` is an S3-compatible bucket (boto3, configured the usual way: environment or
    ~/.aws); anything else is a folder, by default studies/<name>/artifacts next to the study."""
    if spec.artifacts.startswith("s3://"):
        try:
            from optuna.artifacts import Boto3ArtifactStore
            return Boto3ArtifactStore(spec.artifacts.removeprefix("s3://").strip("/"))
        except ImportError as error:
            raise SpecError(f"artifacts = {spec.artifacts!r} needs boto3: pip install boto3.") from error
    folder = Path(spec.artifacts) if spec.artifacts else spec.output_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def teacher_for_study(study: optuna.Study, spec: Spec, splits: Splits, compute: Compute,
                      echo: Callable[[str], None] = print) -> CachedTeacher:
    """The study's teacher: from the local cache, else from the study's artifacts; trained only when the
    study has none yet, and then published.

    A study's teacher is the one its record names, kept locally under that name, wherever this machine would
    cache a teacher for the spec: other data (refused earlier, see `study_setup`) never borrows it.
    """
    record = study.user_attrs.get(RECORD_KEY)
    if record is None:
        cached = teacher.load_or_train(spec, splits, compute, echo=echo)
        record = publish(study, spec, cached)
        if record["cache_id"] == cached.cache_id:
            return cached
    folder = teacher.CACHE_ROOT / record["cache_id"]
    try:
        cached = teacher.load(folder)
    except teacher.CorruptCache:
        echo(f"No usable teacher cache in {folder}: fetching the study's teacher from its artifact store.")
        fetch(record, open_artifact_store(spec), folder)
        cached = teacher.load(folder)
    if cached.meta["data_fingerprint"] != splits.fingerprint:  # study_setup refuses this earlier; never train on it
        raise SpecError(f"the study's teacher {record['cache_id']} was trained on other data than "
                        f"{spec.data.path or spec.data.format}; start a new study on this data with --study-name.")
    return cached


def publish(study: optuna.Study, spec: Spec, cached: CachedTeacher) -> dict:
    """Upload the teacher's files and record them in the study; returns the study's record, which is another
    process's when one published first (the study keeps the first teacher)."""
    if (record := study.user_attrs.get(RECORD_KEY)) is not None:
        return record
    store = open_artifact_store(spec)
    files = {}
    for path in sorted(p for p in cached.folder.iterdir() if p.is_file()):
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
        files[path.name] = {"artifact_id": artifact_id, "sha256": sha256_file(path)}
    record = {"cache_id": cached.cache_id, "files": files}
    study.set_user_attr(RECORD_KEY, record)
    return record


def fetch(record: dict, store, folder: Path) -> None:
    """Download into a scratch folder, verify every file against the study's record, then move into place."""
    scratch = folder.with_name(f"{folder.name}.fetch-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        for name, entry in record["files"].items():
            try:
                download_artifact(artifact_store=store, file_path=str(scratch / name),
                                  artifact_id=entry["artifact_id"])
            except ArtifactNotFound as error:
                raise SpecError(f"the study's teacher artifact {name} ({entry['artifact_id']}) is missing from "
                                "the artifact store; point `artifacts` in the spec at the study's store.") from error
            if sha256_file(scratch / name) != entry["sha256"]:
                raise SpecError(f"the study's teacher artifact {name} ({entry['artifact_id']}) does not match the "
                                "sha256 recorded in the study: it was altered or truncated; restore the artifact "
                                "store, or start a new study with --study-name.")
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish_export(study: optuna.Study, spec: Spec, folder: Path) -> dict[str, str]:
    """Upload an exported student's files as artifacts of the study ({file name: artifact id}), where the
    dashboard lists them. Optuna attaches artifacts to a trial only while it runs, so they go on the study, and
    the winning trial's note names them (kdtune.dashboard.note_export)."""
    store = open_artifact_store(spec)
    return {path.name: upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
            for path in sorted(folder.iterdir()) if path.is_file()}
