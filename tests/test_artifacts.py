"""The study's teacher artifacts are checked against the sha256 the study recorded, not only against the
checksums in the artifacts' own meta.json, which whoever alters the store can rewrite too."""

import json
import shutil

import numpy as np
import pytest
from conftest import CPU_FP32

from kdtune import artifacts, data, study, teacher
from kdtune.provenance import sha256_file
from kdtune.spec import SpecError, load_spec


def refuse_training(*args, **kwargs):
    raise AssertionError("a second teacher was trained for the study")


def test_an_altered_artifact_with_a_consistent_meta_json_is_refused(tiny_spec, workdir, monkeypatch):
    spec = load_spec(tiny_spec("consistent"))
    splits = data.prepare(spec.data, spec.seed)
    the_study = study.open_study(spec, create=True)
    cached = artifacts.teacher_for_study(the_study, spec, splits, CPU_FP32, echo=lambda _: None)  # trains and publishes
    files = the_study.user_attrs[artifacts.RECORD_KEY]["files"]
    store = spec.output_dir / "artifacts"

    # other logits, still a valid .npy, and a meta.json whose checksum agrees with them
    logits_path = store / files["logits_val.npy"]["artifact_id"]
    np.save(logits_path.with_suffix(".npy"), np.load(logits_path) + 1.0)
    logits_path.with_suffix(".npy").replace(logits_path)
    meta_path = store / files["meta.json"]["artifact_id"]
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["logits_val.npy"] = sha256_file(logits_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    shutil.rmtree(cached.folder)  # another machine: no cache folder
    monkeypatch.setattr(teacher, "train", refuse_training)

    with pytest.raises(SpecError, match=r"logits_val.npy .* does not match the sha256 recorded in the study"):
        artifacts.teacher_for_study(study.open_study(spec, create=False), spec, splits, CPU_FP32,
                                    echo=lambda _: None)
    assert not cached.folder.exists()  # nothing fetched is left to be taken for a cache
    assert not list(cached.folder.parent.glob(f"{cached.folder.name}*"))  # nor a scratch folder
