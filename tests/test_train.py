"""The training loop: early stopping on validation accuracy, the best epoch's weights on return, and the
teacher's learning-rate schedule and augmentation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kdtune import train
from kdtune.models import StudentMLP, TeacherCNN
from kdtune.spec import AUGMENTATIONS, LR_SCHEDULES, StudentSpec, TeacherSpec


def cross_entropy(logits, teacher_logits, labels, epoch):
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_waits_patience_epochs_then_restores_the_best_weights(monkeypatch, patience):
    """Validation accuracy peaks at epoch 1 (scripted): training goes on for `patience` epochs without a new
    best, stops, and the model returns holding the weights it had after epoch 1."""
    scripted = iter([0.5, 0.9] + [0.6] * 20)
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    model = StudentMLP((1, 8, 8), 3, 16)
    weights_after = {}

    def report(epoch, val_accuracy):
        weights_after[epoch] = copy.deepcopy(model.state_dict())

    schedule = StudentSpec(max_epochs=20, patience_epochs=patience, batch_size=32, learning_rate=1e-2)
    result = train.fit(model, x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0, report=report)

    best_epoch = 1
    assert result.n_epochs == best_epoch + 1 + patience == len(weights_after)
    assert result.val_curve == [0.5, 0.9] + [0.6] * patience
    assert result.val_accuracy == 0.9
    final = model.state_dict()
    assert all(torch.equal(final[k], weights_after[best_epoch][k]) for k in final)
    last = weights_after[result.n_epochs - 1]  # training did move the weights after the best epoch
    assert not all(torch.equal(last[k], weights_after[best_epoch][k]) for k in last)


def test_training_runs_max_epochs_while_it_keeps_improving(monkeypatch):
    scripted = iter([0.1, 0.2, 0.3, 0.4])
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))
    schedule = StudentSpec(max_epochs=4, patience_epochs=1, batch_size=32)
    result = train.fit(StudentMLP((1, 8, 8), 3, 8), x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0)
    assert result.n_epochs == 4 and result.val_accuracy == 0.4


def test_a_report_that_stops_training_gets_the_result_so_far(monkeypatch):
    """A pruner's verdict (StopTraining from `report`) ends the fit after that epoch, which returns what it
    has: the curve and epochs so far, the best of them, and why it stopped."""
    scripted = iter([0.3, 0.5, 0.4, 0.9])
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))

    def report(epoch, val_accuracy):
        if epoch == 2:
            raise train.StopTraining("pruned after epoch 3")

    schedule = StudentSpec(max_epochs=4, patience_epochs=5, batch_size=32)
    result = train.fit(StudentMLP((1, 8, 8), 3, 8), x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0,
                       report=report)
    assert (result.n_epochs, result.val_curve, result.val_accuracy) == (3, [0.3, 0.5, 0.4], 0.5)
    assert result.stopped_early == "pruned after epoch 3" and result.seconds > 0


@pytest.mark.parametrize("ending", ["nan loss", "ctrl-c"])
def test_a_fit_that_ends_without_a_model_carries_its_epochs(monkeypatch, ending):
    """Divergence and Ctrl-C end a fit with an exception: it carries the epochs trained before, for the record
    a study keeps of every trial."""
    scripted = iter([0.3, 0.5])
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))

    def loss_fn(logits, teacher_logits, labels, epoch):
        if len(epochs_seen) == 2 and ending == "nan loss":
            return cross_entropy(logits, teacher_logits, labels, epoch) * float("nan")
        return cross_entropy(logits, teacher_logits, labels, epoch)

    def report(epoch, val_accuracy):
        epochs_seen.append(epoch)
        if epoch == 1 and ending == "ctrl-c":
            raise KeyboardInterrupt

    epochs_seen = []
    expected = train.TrainingDiverged if ending == "nan loss" else train.TrainingInterrupted
    with pytest.raises(expected) as ended:
        train.fit(StudentMLP((1, 8, 8), 3, 8), x, y, x, y, loss_fn=loss_fn, report=report, seed=0,
                  schedule=StudentSpec(max_epochs=4, patience_epochs=5, batch_size=32))
    assert ended.value.result.val_curve == [0.3, 0.5] and ended.value.result.n_epochs == 2
    assert ended.value.result.seconds > 0


def test_the_schedules_and_augmentations_are_the_ones_the_spec_accepts():
    assert tuple(train.LR_SCHEDULES) == LR_SCHEDULES and tuple(train.AUGMENTATIONS) == AUGMENTATIONS


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_cosine_lowers_the_learning_rate_every_epoch_towards_zero(monkeypatch, lr_schedule):
    """The rate each optimizer step used: the spec's in the first epoch; under cosine, lower in every later epoch
    and near 0 in the last, base * (1 + cos(pi * epoch / max_epochs)) / 2."""
    used = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train.torch.optim, "Adam", RecordingAdam)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    schedule = TeacherSpec(max_epochs=8, patience_epochs=8, batch_size=32, learning_rate=1e-2)
    train.fit(StudentMLP((1, 8, 8), 3, 8), x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0,
              lr_schedule=lr_schedule)

    per_epoch = used[::2]  # two steps per epoch, at the same rate
    assert used[1::2] == per_epoch and len(per_epoch) == 8 and per_epoch[0] == 1e-2
    if lr_schedule == "constant":
        assert per_epoch == [1e-2] * 8
    else:
        assert all(later < earlier for earlier, later in zip(per_epoch, per_epoch[1:]))
        assert per_epoch == pytest.approx([1e-2 * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(8)])
        assert 0 < per_epoch[-1] < 0.05 * 1e-2


def shifted(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """`image` (C, H, W) moved down `rows` and right `columns` pixels, zeros where it uncovers: by hand."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    out[:, max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
        image[:, max(-rows, 0):height - max(rows, 0), max(-columns, 0):width - max(columns, 0)]
    return out


def test_shift_moves_each_image_by_its_own_offset_of_at_most_two_pixels():
    images = torch.rand(200, 1, 9, 7) + 0.1  # no zero pixels: a zero in the output was uncovered
    moved = train.shift_images(images, torch.Generator().manual_seed(0))
    offsets = []
    for image, out in zip(images, moved):
        matches = [(r, c) for r in range(-2, 3) for c in range(-2, 3) if torch.equal(out, shifted(image, r, c))]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert set(offsets) == {(r, c) for r in range(-2, 3) for c in range(-2, 3)}  # all 25 offsets drawn
    again = train.shift_images(images, torch.Generator().manual_seed(0))
    assert torch.equal(again, moved)


def fit_weights(lr_schedule: str, augment: str, seed: int = 0) -> list[torch.Tensor]:
    """The weights after 3 epochs (validation is scripted to improve every epoch)."""
    scripted = iter([0.1, 0.2, 0.3])
    torch.manual_seed(0)
    model = StudentMLP((1, 8, 8), 3, 16)
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 3, (96,))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "accuracy", lambda *args: next(scripted))
        train.fit(model, x, y, x, y, loss_fn=cross_entropy, seed=seed, lr_schedule=lr_schedule, augment=augment,
                  schedule=TeacherSpec(max_epochs=3, patience_epochs=3, batch_size=32))
    return list(model.state_dict().values())


def test_cosine_and_shift_training_is_reproducible_under_a_seed_and_differs_from_plain():
    weights = fit_weights("cosine", "shift")
    assert all(torch.equal(a, b) for a, b in zip(weights, fit_weights("cosine", "shift")))
    for other in (fit_weights("cosine", "shift", seed=1), fit_weights("cosine", "none"),
                  fit_weights("constant", "shift"), fit_weights("constant", "none")):
        assert not all(torch.equal(a, b) for a, b in zip(weights, other))


def test_constant_rate_without_augmentation_trains_bit_identically_to_the_loop_before_them(monkeypatch):
    """The loop as it was before schedules and augmentation existed, written out: Adam at a constant rate over
    seeded permutations. Validation is scripted to improve every epoch, so `fit` returns its last weights."""
    scripted = iter([0.1, 0.2, 0.3])
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 3, (96,))
    torch.manual_seed(0)
    model, before = TeacherCNN((1, 8, 8), 3), TeacherCNN((1, 8, 8), 3)
    before.load_state_dict(model.state_dict())
    train.fit(model, x, y, x, y, loss_fn=cross_entropy, seed=7, lr_schedule="constant", augment="none",
              schedule=TeacherSpec(max_epochs=3, patience_epochs=3, batch_size=32, learning_rate=2e-3))

    optimizer = torch.optim.Adam(before.parameters(), lr=2e-3, fused=True)
    shuffle = torch.Generator().manual_seed(7)
    before.train()
    for _ in range(3):
        for batch in torch.randperm(len(x), generator=shuffle).split(32):
            loss = F.cross_entropy(before(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
