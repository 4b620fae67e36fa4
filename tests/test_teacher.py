"""The teacher cache: hit, miss, invalidation and corruption."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CPU_FP32

from kdtune import data, hardware, teacher
from kdtune.spec import Spec, load_spec
from kdtune.train import accuracy_of_logits
from kdtune.train import fit as train_fit


@pytest.fixture
def trained(tiny_spec):
    spec = load_spec(tiny_spec())
    splits = data.prepare(spec.data, spec.seed)
    return spec, splits, teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)


def refuse_training(*args, **kwargs):
    raise AssertionError("the teacher was retrained")


def test_cache_holds_weights_logits_and_meta(trained):
    spec, splits, cached = trained
    assert {p.name for p in cached.folder.iterdir()} == {"weights.pt", "logits_train.npy", "logits_val.npy",
                                                         "logits_test.npy", "meta.json"}
    assert cached.logits["train"].dtype == torch.float32
    assert cached.logits["train"].shape == (len(splits.x_train), 10)
    assert cached.logits["test"].shape == (len(splits.x_test), 10)
    meta = json.loads((cached.folder / "meta.json").read_text())
    assert meta["val_accuracy"] == pytest.approx(accuracy_of_logits(cached.logits["val"], splits.y_val))
    assert meta["data_fingerprint"] == splits.fingerprint and "torch" in meta["versions"]


def test_weights_reload_and_reproduce_the_cached_logits(trained):
    _, splits, cached = trained
    model = teacher.load_model(cached).eval()
    with torch.inference_mode():
        assert torch.allclose(model(splits.x_val), cached.logits["val"], atol=1e-4)


def test_second_run_is_a_cache_hit(trained, monkeypatch):
    spec, splits, cached = trained
    monkeypatch.setattr(teacher, "train", refuse_training)
    again = teacher.load_or_train(spec, splits, CPU_FP32)
    assert again.cache_id == cached.cache_id
    assert torch.equal(again.logits["val"], cached.logits["val"])


def cache_id(spec, data_fingerprint: str) -> str:
    """The spec's cache id, its precision resolved for this machine as a command resolves it."""
    return teacher.cache_id(spec, data_fingerprint, hardware.resolve_compute(spec.device, spec.precision))


def test_other_config_or_seed_or_split_misses(trained, tiny_spec, monkeypatch):
    spec, splits, cached = trained
    same_teacher_other_search = load_spec(tiny_spec("b", width="64"))
    assert cache_id(same_teacher_other_search, splits.fingerprint) == cached.cache_id
    other_config = replace(spec, teacher=replace(spec.teacher, max_epochs=3))
    assert cache_id(other_config, splits.fingerprint) != cached.cache_id
    # a teacher trained in bf16 is another teacher; auto that resolves to fp32 (no native bf16 here) is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 is emulated on most CI machines, and says so
        assert cache_id(replace(spec, precision="bf16"), splits.fingerprint) != cached.cache_id
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cache_id(replace(spec, precision="auto"), splits.fingerprint) == cached.cache_id
    other_seed = replace(spec, seed=1)
    assert cache_id(other_seed, data.prepare(spec.data, 1).fingerprint) != cached.cache_id


def test_new_teacher_keys_at_their_defaults_keep_the_cache_ids_of_teachers_cached_before_them():
    """The ids main's cache_id gave before lr_schedule and augment existed (fixed fingerprint, fp32 on the CPU)."""
    spec = Spec(name="any")
    assert teacher.cache_id(spec, "fingerprint", CPU_FP32) == "f057e9a2ab09613b"
    fm = replace(spec, teacher=replace(spec.teacher, max_epochs=30, lr_schedule="constant", augment="none"))
    assert teacher.cache_id(fm, "fingerprint", CPU_FP32) == "fc7980e0747efe4e"
    changes = ({"lr_schedule": "cosine"}, {"augment": "shift"}, {"lr_schedule": "cosine", "augment": "shift"})
    others = {teacher.cache_id(replace(fm, teacher=replace(fm.teacher, **change)), "fingerprint", CPU_FP32)
              for change in changes}
    assert len(others) == 3 and "fc7980e0747efe4e" not in others


def test_the_teacher_trains_with_its_spec_schedule_and_augmentation(tiny_spec, monkeypatch):
    spec = load_spec(tiny_spec())
    spec = replace(spec, teacher=replace(spec.teacher, lr_schedule="cosine", augment="shift"))
    splits = data.prepare(spec.data, spec.seed)
    passed = {}

    def fit(*args, **kwargs):
        passed.update(kwargs)
        return train_fit(*args, **kwargs)

    monkeypatch.setattr(teacher, "fit", fit)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    assert (passed["lr_schedule"], passed["augment"]) == ("cosine", "shift")
    assert (cached.meta["teacher"]["lr_schedule"], cached.meta["teacher"]["augment"]) == ("cosine", "shift")


@pytest.mark.parametrize("damage", ["flip a byte of logits", "delete weights", "garble meta"])
def test_corrupt_cache_is_reported_and_retrained(trained, damage):
    spec, splits, cached = trained
    if damage == "flip a byte of logits":
        path = cached.folder / "logits_train.npy"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "delete weights":
        (cached.folder / "weights.pt").unlink()
    else:
        (cached.folder / "meta.json").write_text("{not json")
    messages = []
    again = teacher.load_or_train(spec, splits, CPU_FP32, echo=messages.append)
    assert "corrupt" in messages[0]
    assert teacher.load(again.folder).cache_id == cached.cache_id  # the retrained cache verifies
    assert np.array_equal(np.load(again.folder / "logits_train.npy"), again.logits["train"].numpy())
