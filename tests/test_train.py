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
