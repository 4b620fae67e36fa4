"""Precision and threads: auto never picks emulated bf16, explicit bf16 warns once, training runs under it."""

import functools
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdtune import data, hardware, student, study, target, teacher
from kdtune.losses import hinton_loss
from kdtune.models import StudentMLP
from kdtune.spec import StudentSpec, load_spec
from kdtune.train import every_epoch, fit, predict

CPU = torch.device("cpu")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    hardware._warn_emulated_bf16.cache_clear()


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))


def test_auto_stays_fp32_without_native_bf16(cpu_without_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and says nothing
        compute = hardware.resolve_compute("cpu", "auto")
    assert compute.autocast_dtype is None and compute.precision == "fp32"


def test_auto_picks_bf16_where_it_is_native_for_the_teacher_and_students_large_enough(cpu_with_bf16):
    compute = hardware.resolve_compute("cpu", "auto")
    assert compute.autocast_dtype == torch.bfloat16  # the teacher's
    smallest = hardware.AUTO_BF16_MIN_MULTIPLY_ADDS
    assert compute.for_student(smallest).autocast_dtype == torch.bfloat16
    assert compute.for_student(smallest - 1).autocast_dtype is None
    assert compute.for_student(None).autocast_dtype is None  # not counted: fp32, never the slow choice
    assert compute.for_student(smallest - 1).for_student(smallest).autocast_dtype is None  # resolved once


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_explicit_precision_holds_for_students_of_every_size(cpu_with_bf16, precision):
    compute = hardware.resolve_compute("cpu", precision)
    assert {compute.for_student(n).precision for n in (1, 10 ** 9, None)} == {precision}
    assert compute.policy == precision


@pytest.mark.parametrize("family, width, expected", [
    ("mlp", 128, "fp32"), ("mlp", 256, "bf16"),  # 784 x width + width x 10 multiply-adds: 101,632 and 203,264
    ("cnn", 6, "fp32"), ("cnn", 7, "bf16")])  # 175,224 and 229,124
def test_auto_resolves_a_student_by_its_counted_multiply_adds(cpu_with_bf16, family, width, expected):
    architecture = student.Architecture(family, 1, (1, 28, 28), 10)
    assert architecture.compute_for(width, hardware.resolve_compute("cpu", "auto")).precision == expected


def test_auto_trains_a_student_it_cannot_count_in_fp32_and_says_so(cpu_with_bf16, monkeypatch):
    nn = torch.nn
    monkeypatch.setitem(student.FAMILIES, "with_prelu", lambda input_shape, n_classes, width, depth: nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.PReLU(), nn.Linear(width, n_classes)))
    architecture = student.Architecture("with_prelu", 1, (1, 28, 28), 10)
    with pytest.warns(UserWarning, match="cannot count the multiply-adds of with_prelu"):
        assert architecture.compute_for(2048, hardware.resolve_compute("cpu", "auto")).precision == "fp32"


def test_explicit_bf16_is_honoured_and_warns_once_where_emulated(cpu_without_bf16):
    with pytest.warns(UserWarning, match="no native bf16") as caught:
        first = hardware.resolve_compute("cpu", "bf16")
        second = hardware.resolve_compute("cpu", "bf16")
    assert len(caught) == 1
    assert first.autocast_dtype == second.autocast_dtype == torch.bfloat16


def test_fp32_never_autocasts(cpu_with_bf16):
    assert hardware.resolve_compute("cpu", "fp32").autocast_dtype is None


def record_linear_output_dtypes(model: torch.nn.Module, seen: list | None = None) -> list[tuple[bool, torch.dtype]]:
    """(training?, output dtype) of every Linear layer's forward pass, appended to `seen` as the model runs."""
    seen = [] if seen is None else seen
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    return seen


@pytest.mark.parametrize("autocast_dtype, expected", [(torch.bfloat16, torch.bfloat16), (None, torch.float32)],
                         ids=["bf16", "fp32"])
def test_a_student_trains_in_the_autocast_dtype_and_keeps_fp32_weights(autocast_dtype, expected):
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    model = StudentMLP((1, 8, 8), 3, 16)
    seen = record_linear_output_dtypes(model)
    loss_fn = every_epoch(functools.partial(hinton_loss, temperature=2.0, label_weight=0.5))
    result = fit(model, x, y, x, y, loss_fn=loss_fn, schedule=StudentSpec(max_epochs=2, batch_size=32), seed=0,
                 teacher_logits=torch.randn(64, 3), autocast_dtype=autocast_dtype)
    assert result.n_epochs == 2
    training = [dtype for is_training, dtype in seen if is_training]
    evaluating = [dtype for is_training, dtype in seen if not is_training]
    assert len(training) == 2 * 2 * 2  # 2 epochs x 2 batches x 2 layers
    assert set(training) == set(evaluating) == {expected}  # validation runs in it too
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = predict(model, x, autocast_dtype)
    assert logits.dtype == torch.float32 and logits.shape == (64, 3)


@pytest.mark.parametrize("precision, width, recorded, expected", [
    ("auto", 256, None, torch.bfloat16), ("auto", 16, None, torch.float32), ("fp32", 256, None, torch.float32),
    ("bf16", 16, None, torch.bfloat16), ("auto", 16, "bf16", torch.bfloat16)],
    ids=["auto-wide", "auto-narrow", "fp32", "bf16", "auto-study-from-before-sizes"])
def test_a_trial_trains_in_the_precision_the_policy_picks(cpu_with_bf16, tiny_spec, monkeypatch, precision, width,
                                                          recorded, expected):
    """End to end: the spec's precision, resolved for this (claimed) CPU and the trial's student (28 x 28 images:
    width 256 is 203,264 multiply-adds, width 16 12,704), reaches the student, its validation logits and the
    trial's record. An auto study that recorded plain bf16, before auto went by size, stays all bf16."""
    spec = replace(load_spec(tiny_spec(student_epochs=1, width=str(width), search="control_arms = false")),
                   precision=precision)
    splits = data.prepare(spec.data, spec.seed)
    logits = {"train": torch.randn(len(splits.x_train), splits.n_classes),
              "val": torch.randn(len(splits.x_val), splits.n_classes)}
    stub_teacher = teacher.CachedTeacher("stub", Path("."), logits, {"val_accuracy": 0.5, "n_parameters": None})
    seen = []

    class RecordedStudent(StudentMLP):
        def __init__(self, *args):
            super().__init__(*args)
            record_linear_output_dtypes(self, seen)

    monkeypatch.setitem(student.FAMILIES, "mlp", RecordedStudent)
    compute = hardware.resolve_compute(spec.device, spec.precision)  # as every command does, once
    the_study = study.open_study(spec, create=True)
    if recorded:
        the_study.set_user_attr("precision", recorded)
    predicted_in = []
    monkeypatch.setattr(study, "predict", lambda model, x, dtype: predicted_in.append(dtype) or predict(model, x,
                                                                                                        dtype))
    target.run(the_study, study.make_objective(spec, splits, stub_teacher, compute), n_trials=1, timeout=None,
              progress_bar=False)
    assert seen and {dtype for is_training, dtype in seen if is_training} == {expected}
    assert predicted_in == [None if expected == torch.float32 else expected]  # the trial's validation logits
    assert the_study.trials[0].user_attrs["precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]


def test_configure_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert hardware.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert hardware.configure_threads() == hardware.available_cpus() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_available_cpus_counts_a_container_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(64)))
    real_path = hardware.Path
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "Path", lambda p: cpu_max if p == "/sys/fs/cgroup/cpu.max" else real_path(p))
    cpu_max.write_text("200000 100000\n")
    assert hardware.available_cpus() == 2
    cpu_max.write_text("max 100000\n")
    assert hardware.available_cpus() == 64
