"""A student's cost: multiply-adds against hand counts, latency statistics from the timed calls only, a cache
that measures each width once per machine and thread count, and trials that carry it."""

import json

import optuna
import optuna_dashboard
import pytest
import torch
from conftest import CPU_FP32
from torch import nn

from kdtune import cost, counting, data, runtime, student, study, target, teacher, timing
from kdtune.models import StudentMLP, TeacherCNN
from kdtune.spec import load_spec
from kdtune.student import Architecture, StudentConfig
from kdtune.train import FitResult

MLP = Architecture("mlp", 1, (1, 28, 28), 10)

TRIAL_COSTS = {"multiply_adds", "latency_ms_batch1", "latency_ms_batch256", "latency_threads", "latency_cpu"}


@pytest.mark.parametrize("width", [16, 512])
def test_multiply_adds_of_an_mlp_are_the_hand_count(width):
    with torch.device("meta"):
        model = StudentMLP((1, 28, 28), 10, width)
    assert counting.multiply_adds(model, (1, 28, 28)) == 784 * width + width * 10


def test_multiply_adds_count_convolutions_per_output_value():
    with torch.device("meta"):
        model = TeacherCNN((1, 28, 28), 10)
    # 3x3 conv 1 -> 64 channels: 26x26 outputs; pooled to 13x13; 3x3 conv 64 -> 128: 11x11; pooled to 5x5; dense
    conv1, conv2 = 26 * 26 * 64 * (1 * 9), 11 * 11 * 128 * (64 * 9)
    assert counting.multiply_adds(model, (1, 28, 28)) == conv1 + conv2 + 128 * 5 * 5 * 1024 + 1024 * 10


def test_multiply_adds_count_normalisations_and_are_unknown_for_layers_they_cannot_count():
    normalised = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.LayerNorm(8))
    assert counting.multiply_adds(normalised, (1, 28, 28)) == 784 * 8 + 8 + 8
    embedded = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Embedding(4, 2))  # weights of another kind
    assert counting.multiply_adds(embedded, (1, 28, 28)) is None


def test_latency_is_timed_at_batch_1_and_256_over_at_least_20_calls():
    found = cost.latency(StudentMLP((1, 28, 28), 10, 32), (1, 28, 28))
    assert sorted(found) == [1, 256]
    for timed in found.values():
        assert timed["n_calls"] >= 20 and 0 < timed["median_ms"] <= timed["p95_ms"]


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_calls = 0

    def forward(self, x):
        self.n_calls += 1
        return x


def test_median_and_p95_come_from_the_timed_calls_only(monkeypatch):
    # the clock, scripted: the k-th timed call of each batch size takes k ms (1 .. 20)
    times, now = [], 0.0
    for _batch in cost.BATCH_SIZES:
        for k in range(1, 21):
            times += [now, now + k / 1000]
            now += 1.0
    clock = iter(times)
    monkeypatch.setattr(timing, "perf_counter", lambda: next(clock))
    model = Counted()
    found = cost.latency(model, (4, 4), n_warmup_calls=5, n_calls=20)
    assert model.n_calls == len(cost.BATCH_SIZES) * (5 + 20)  # the warm-ups ran ...
    assert next(clock, None) is None  # ... untimed: two clock reads per timed call, all of them used
    for timed in found.values():
        assert timed == {"median_ms": 10.5, "p95_ms": 19.05, "n_calls": 20}  # numpy's linear p95 of 1..20


@pytest.fixture
def measured(workdir, monkeypatch):
    """(width, torch threads) of each real measurement; each returns a made-up result."""
    calls = []

    def measure(architecture, width, runtime_name="pytorch"):
        calls.append((width, torch.get_num_threads()) + ((runtime_name,) if runtime_name != "pytorch" else ()))
        slower = 2.0 if runtime_name == "pytorch" else 1.0  # ONNX Runtime, here, the faster
        return {"multiply_adds": 794 * width,
                "latency": {"1": {"median_ms": 0.5 * slower, "p95_ms": 0.6, "n_calls": 20},
                            "256": {"median_ms": 7.0 * slower, "p95_ms": 8.0, "n_calls": 20}}}

    monkeypatch.setattr(cost, "measure", measure)
    return calls


def test_a_width_is_measured_once_per_thread_count(measured):
    first = cost.of_student(MLP, 32)
    assert first == {"multiply_adds": 794 * 32, "latency_ms_batch1": 1.0, "latency_ms_batch256": 14.0,
                     "latency_threads": torch.get_num_threads(), "latency_cpu": first["latency_cpu"]}
    assert cost.of_student(MLP, 32) == first  # other knobs, the same student
    assert len(measured) == 1
    cost.of_student(MLP, 64)
    assert len(measured) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert cost.of_student(MLP, 32)["latency_threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert measured == [(32, threads), (64, threads), (32, threads + 1)]
    assert len(list(cost.CACHE_ROOT.glob("*.json"))) == 3


@pytest.mark.skipif(bool(runtime.missing_packages()), reason="needs kdtune[export]: its version keys the cache")
def test_onnx_runtime_latency_is_recorded_beside_pytorch_s_when_asked_and_cached_apart(measured):
    config = StudentConfig(4.0, 0.5, 32)
    both = cost.of_student(MLP, config.width, onnxruntime=True)
    assert (both["latency_ms_batch1"], both["latency_ms_batch256"]) == (1.0, 14.0)  # PyTorch's
    assert (both["latency_ms_batch1_onnxruntime"], both["latency_ms_batch256_onnxruntime"]) == (0.5, 7.0)
    assert measured == [(32, torch.get_num_threads()), (32, torch.get_num_threads(), "onnxruntime")]
    assert cost.of_student(MLP, config.width, onnxruntime=True) == both  # both from the cache now
    assert "latency_ms_batch1_onnxruntime" not in cost.of_student(MLP, config.width)  # only when asked
    assert len(measured) == 2


@pytest.mark.skipif(bool(runtime.missing_packages()), reason="needs kdtune[export]")
def test_onnx_runtime_times_the_exported_student():
    found = cost.measure(MLP, 16, "onnxruntime")
    assert found["multiply_adds"] == 784 * 16 + 16 * 10
    assert set(found["latency"]) == {"1", "256"}
    assert 0 < found["latency"]["1"]["median_ms"] < found["latency"]["256"]["median_ms"]
    assert found["latency"]["1"]["n_calls"] == timing.N_TIMED_CALLS


@pytest.mark.parametrize("damage", ["{not json", "", "[]", '{"key": {}}', "cut"])
def test_a_corrupt_cache_file_is_measured_again(measured, damage):
    first = cost.of_student(MLP, 32)
    [path] = cost.CACHE_ROOT.glob("*.json")
    path.write_text(path.read_text()[:60] if damage == "cut" else damage)
    assert cost.of_student(MLP, 32) == first
    assert len(measured) == 2
    assert json.loads(path.read_text())["key"]["width"] == 32  # rewritten whole ...
    cost.of_student(MLP, 32)
    assert len(measured) == 2  # ... and read from then on


def test_every_trial_carries_its_student_s_cost_pruned_ones_too(tiny_spec, monkeypatch):
    spec = load_spec(tiny_spec())
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
    the_study = study.open_study(spec, create=True)
    objective = study.make_objective(spec, splits, cached, CPU_FP32)
    target.run(the_study, objective, n_trials=2, timeout=None)
    monkeypatch.setattr(student, "train", lambda *args, **kwargs: (None, FitResult(
        0.5, 1, 0.1, [0.5], stopped_early="pruned after epoch 1")))  # as the pruner stops a student
    target.run(the_study, objective, n_trials=3, timeout=None)
    trials = the_study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    for trial in trials:
        attrs, width = trial.user_attrs, trial.params["width"]
        assert TRIAL_COSTS <= set(attrs)
        assert attrs["multiply_adds"] == 784 * width + width * 10
        assert attrs["latency_ms_batch1"] > 0 and attrs["latency_ms_batch256"] > 0
        assert attrs["latency_threads"] == torch.get_num_threads()
        note = optuna_dashboard.get_note(optuna.Trial(the_study, trial._trial_id))
        assert f"{784 * width + width * 10:,} multiply-adds; CPU latency" in note
    assert len(list(cost.CACHE_ROOT.glob("*.json"))) == len({t.params["width"] for t in trials})


def test_grey_one_layer_mlps_keep_their_measurements_and_other_students_get_their_own():
    """The key of a grey one-layer MLP is the one it had before colour and families, so measured widths stay
    cached; depth, channels, family and a user family's source each make another student."""
    key = cost.cache_key(MLP, 32)
    assert {k: key[k] for k in ("family", "image_shape", "n_classes", "width")} == {
        "family": "mlp", "image_shape": [28, 28], "n_classes": 10, "width": 32}
    assert "depth" not in key and "input_shape" not in key
    others = [Architecture("mlp", 2, (1, 28, 28), 10), Architecture("mlp", 1, (3, 28, 28), 10),
              Architecture("cnn", 1, (1, 28, 28), 10)]
    assert len({json.dumps(cost.cache_key(a, 32), sort_keys=True) for a in [MLP, *others]}) == 4
