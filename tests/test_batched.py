"""Narrow students trained several at once: each one's result is the one it gets trained alone."""

import pytest
import torch
from conftest import CPU_FP32

from kdtune import batched, student
from kdtune.hardware import Compute
from kdtune.readers import read_embedded
from kdtune.spec import StudentSpec
from kdtune.student import Architecture, StudentConfig
from kdtune.train import StopTraining, TrainingDiverged
from kdtune.transfer import StudentData

SCHEDULE = StudentSpec(max_epochs=4, patience_epochs=10, batch_size=64)
# different widths (padded in the stack), temperatures, lambdas and loss forms
CONFIGS = [StudentConfig(2.0, 0.3, 16), StudentConfig(8.0, 0.7, 40, "reference"), StudentConfig(4.0, 0.1, 33)]


@pytest.fixture(scope="module")
def data() -> StudentData:
    """800 real images: 600 to train on, with stand-in teacher logits that lean towards the label, 200 to validate."""
    full = read_embedded()
    x = torch.as_tensor(full.x_train[:800]).float().view(800, 1, 28, 28)
    x = x / x.max()
    y = torch.as_tensor(full.y_train[:800]).long()
    generator = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(800, 10, generator=generator) * 3 + 5 * torch.nn.functional.one_hot(y, 10)
    return StudentData(x[:600], y[:600], teacher_logits[:600], x[600:], y[600:], (1, 28, 28), 10)


def assert_same_student(alone: tuple, together: tuple) -> None:
    (model, result), (batched_model, outcome) = alone, together
    assert outcome.error is None
    assert outcome.result.val_curve == result.val_curve
    assert (outcome.result.val_accuracy, outcome.result.n_epochs) == (result.val_accuracy, result.n_epochs)
    assert outcome.result.stopped_early == result.stopped_early
    for name, weights in model.state_dict().items():
        torch.testing.assert_close(batched_model.state_dict()[name], weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_students_trained_together_end_as_each_does_alone(data, depth):
    architecture = Architecture("mlp", depth, (1, 28, 28), 10)
    together = student.train_together(CONFIGS, architecture, SCHEDULE, data, 0, CPU_FP32, [None] * len(CONFIGS))
    for config, outcome in zip(CONFIGS, together):
        assert_same_student(student.train(config, architecture, SCHEDULE, data, 0, CPU_FP32), outcome)


def test_students_of_the_newer_loss_forms_on_a_cosine_schedule_train_together_as_alone(data):
    """Each student's own loss, DKD's warm-up by epoch included, and the schedule's learning rate per epoch."""
    architecture = Architecture("mlp", 1, (1, 28, 28), 10)
    cosine = StudentSpec(max_epochs=4, patience_epochs=10, batch_size=64, lr_schedule="cosine")
    configs = [StudentConfig(4.0, 0.5, 16, "dkd", (("alpha", 1.0), ("beta", 8.0))), StudentConfig(2.0, 0.3, 24, "dist"),
               StudentConfig(2.0, 0.02, 33, "lskd"), StudentConfig(1.0, 0.1, 20, "mse")]
    together = student.train_together(configs, architecture, cosine, data, 0, CPU_FP32, [None] * len(configs))
    for config, outcome in zip(configs, together):
        assert_same_student(student.train(config, architecture, cosine, data, 0, CPU_FP32), outcome)


def test_a_pruned_student_leaves_the_batch_and_the_others_go_on_undisturbed(data, monkeypatch):
    architecture = Architecture("mlp", 1, (1, 28, 28), 10)

    def prune_after_second_epoch(epoch, val_accuracy):
        if epoch == 1:
            raise StopTraining("pruned after epoch 2")

    reports = [None, prune_after_second_epoch, None]
    students_per_step = []
    forward = batched.StackedMLP.forward
    monkeypatch.setattr(batched.StackedMLP, "forward",
                        lambda self, x: students_per_step.append(self.weights[0].shape[0]) or forward(self, x))
    together = student.train_together(CONFIGS, architecture, SCHEDULE, data, 0, CPU_FP32, reports)
    monkeypatch.undo()
    assert together[1][1].result.stopped_early == "pruned after epoch 2"
    assert set(students_per_step) == {3, 2}, "after the verdict the batch trains two students, not three"
    for config, report, outcome in zip(CONFIGS, reports, together):
        assert_same_student(student.train(config, architecture, SCHEDULE, data, 0, CPU_FP32, report), outcome)


def test_patience_ends_each_student_on_its_own(data):
    """A student that stops improving stops, as alone; the others train on to their own ends."""
    architecture = Architecture("mlp", 1, (1, 28, 28), 10)
    impatient = StudentSpec(max_epochs=8, patience_epochs=1, batch_size=64)
    together = student.train_together(CONFIGS, architecture, impatient, data, 0, CPU_FP32, [None] * len(CONFIGS))
    alone = [student.train(config, architecture, impatient, data, 0, CPU_FP32) for config in CONFIGS]
    assert len({result.n_epochs for _, result in alone}) > 1, "the students should stop at different epochs"
    for one, outcome in zip(alone, together):
        assert_same_student(one, outcome)


def plain(logits, teacher_logits, labels, epoch):
    return torch.nn.functional.cross_entropy(logits, labels)


def test_a_diverging_student_fails_alone_and_the_others_are_unharmed(data):
    models = [student.initial(config, Architecture("mlp", 1, (1, 28, 28), 10), 0, 10)[0] for config in CONFIGS[:2]]

    def poisoned(logits, teacher_logits, labels, epoch):  # NaN from the first step of the first epoch on
        return torch.nn.functional.cross_entropy(logits, labels) * float("nan")

    outcomes = batched.fit_together([batched.Student(models[0], poisoned), batched.Student(models[1], plain)],
                                    data.x_train, data.y_train, data.x_val, data.y_val, schedule=SCHEDULE, seed=0)
    assert isinstance(outcomes[0].error, TrainingDiverged) and "epoch 1" in str(outcomes[0].error)
    assert outcomes[1].error is None and outcomes[1].result.n_epochs == SCHEDULE.max_epochs
    assert all(torch.isfinite(p).all() for p in models[1].parameters())


def test_an_interrupted_batch_hands_back_every_student_s_epochs_so_far(data):
    models = [student.initial(config, Architecture("mlp", 1, (1, 28, 28), 10), 0, 10)[0] for config in CONFIGS[:2]]
    calls = []

    def interrupted_in_second_epoch(logits, teacher_logits, labels, epoch):
        calls.append(1)
        if len(calls) > len(data.x_train) // SCHEDULE.batch_size + 1:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(logits, labels)

    students = [batched.Student(models[0], interrupted_in_second_epoch), batched.Student(models[1], plain)]
    with pytest.raises(batched.BatchInterrupted) as interrupted:
        batched.fit_together(students, data.x_train, data.y_train, data.x_val, data.y_val, schedule=SCHEDULE, seed=0)
    assert {i: outcome.result.n_epochs for i, outcome in interrupted.value.interrupted.items()} == {0: 1, 1: 1}


def test_a_student_that_left_before_a_stop_keeps_its_end(data):
    """Pruned in the first epoch, student 0 is handed over finished; the stop in the second epoch interrupts
    student 1 only."""
    models = [student.initial(config, Architecture("mlp", 1, (1, 28, 28), 10), 0, 10)[0] for config in CONFIGS[:2]]
    steps, ended = [], []

    def interrupted_in_second_epoch(logits, teacher_logits, labels, epoch):
        steps.append(1)
        if len(steps) > len(data.x_train) // SCHEDULE.batch_size + 1:
            raise KeyboardInterrupt
        return plain(logits, teacher_logits, labels, epoch)

    def prune_at_once(epoch, val_accuracy):
        raise StopTraining("pruned after epoch 1")

    students = [batched.Student(models[0], plain, prune_at_once, ended.append),
                batched.Student(models[1], interrupted_in_second_epoch, None, ended.append)]
    with pytest.raises(batched.BatchInterrupted) as interrupted:
        batched.fit_together(students, data.x_train, data.y_train, data.x_val, data.y_val, schedule=SCHEDULE, seed=0)
    assert list(interrupted.value.interrupted) == [1]
    assert len(ended) == 1 and ended[0].result.stopped_early == "pruned after epoch 1"
    assert ended[0].result.val_accuracy == ended[0].result.val_curve[0] > 0


def test_only_fp32_mlps_up_to_the_width_limit_train_together():
    mlp, cnn = Architecture("mlp", 1, (1, 28, 28), 10), Architecture("cnn", 1, (1, 28, 28), 10)
    assert student.trains_together(mlp, CPU_FP32, student.BATCH_MAX_WIDTH)
    assert not student.trains_together(mlp, CPU_FP32, student.BATCH_MAX_WIDTH + 1)
    assert not student.trains_together(cnn, CPU_FP32, 16)
    assert not student.trains_together(mlp, Compute(torch.device("cpu"), torch.bfloat16), 16)
    distilled, alone = StudentConfig(2.0, 0.5, 16), StudentConfig(2.0, 1.0, 16)
    assert student.batch_key(distilled, mlp, CPU_FP32) != student.batch_key(alone, mlp, CPU_FP32)
    with pytest.raises(ValueError):
        student.train_together([distilled, alone], mlp, SCHEDULE, None, 0, CPU_FP32, [None, None])
