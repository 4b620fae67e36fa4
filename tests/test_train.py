"""The training loop: early stopping on validation accuracy, and the best epoch's weights on return."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kdtune import train
from kdtune.models import StudentMLP
from kdtune.spec import StudentSpec


def cross_entropy(logits, teacher_logits, labels):
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_waits_patience_epochs_then_restores_the_best_weights(monkeypatch, patience):
    """Validation accuracy peaks at epoch 1 (scripted): training goes on for `patience` epochs without a new
    best, stops, and the model returns holding the weights it had after epoch 1."""
    scripted = iter([0.5, 0.9] + [0.6] * 20)
    monkeypatch.setattr(train, "accuracy", lambda *args: next(scripted))
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    model = StudentMLP((8, 8), 3, 16)
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
    result = train.fit(StudentMLP((8, 8), 3, 8), x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0)
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
    result = train.fit(StudentMLP((8, 8), 3, 8), x, y, x, y, loss_fn=cross_entropy, schedule=schedule, seed=0,
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

    def loss_fn(logits, teacher_logits, labels):
        if len(epochs_seen) == 2 and ending == "nan loss":
            return cross_entropy(logits, teacher_logits, labels) * float("nan")
        return cross_entropy(logits, teacher_logits, labels)

    def report(epoch, val_accuracy):
        epochs_seen.append(epoch)
        if epoch == 1 and ending == "ctrl-c":
            raise KeyboardInterrupt

    epochs_seen = []
    expected = train.TrainingDiverged if ending == "nan loss" else train.TrainingInterrupted
    with pytest.raises(expected) as ended:
        train.fit(StudentMLP((8, 8), 3, 8), x, y, x, y, loss_fn=loss_fn, report=report, seed=0,
                  schedule=StudentSpec(max_epochs=4, patience_epochs=5, batch_size=32))
    assert ended.value.result.val_curve == [0.3, 0.5] and ended.value.result.n_epochs == 2
    assert ended.value.result.seconds > 0
