"""The loops kdtune is measured against, written here and never used by the product.

`naive_fit` is the training loop an Optuna/PyTorch user writes today: TensorDataset + a shuffling DataLoader,
a per-batch `loss.item()` for logging, a per-epoch evaluation through a DataLoader, default Adam. Given a
teacher *module* instead of cached logits, it is the common knowledge-distillation loop
(haitongli/knowledge-distillation-pytorch style): the teacher's forward pass runs on every batch, no cache.
"""

from __future__ import annotations

from typing import Callable

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kdtune.bands import size_bands as cut_bands
from kdtune.losses import LOSSES
from kdtune.models import StudentMLP, TeacherCNN, n_parameters
from kdtune.spec import Spec
from kdtune.student import Architecture
from kdtune.study import assign_band, suggest


def seed_cnn(image_shape: tuple[int, int], n_classes: int) -> nn.Sequential:
    """The teacher as a user ports the seed project: conv, ReLU, pool, in the default memory layout. Built in
    the same order as kdtune's TeacherCNN, so the same seed gives the same initial weights."""
    height, width = (TeacherCNN.features_side(side) for side in image_shape)
    return nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, kernel_size=3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * height * width, 1024), nn.ReLU(), nn.Linear(1024, n_classes))


class SameShuffle(Sampler[int]):
    """What DataLoader(shuffle=True) does, with the permutations kdtune's loop draws for the same seed: both
    loops then train on the same batches, so their accuracies must agree and only their speed may differ."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def naive_fit(model: nn.Module, x_train, y_train, x_val, y_val, *, loss_fn, epochs: int, batch_size: int,
              learning_rate: float, seed: int, teacher: nn.Module | torch.Tensor | None = None,
              patience: int | None = None, report: Callable[[int, float], None] | None = None) -> list[float]:
    """Train like the usual tutorial loop; return the validation accuracy of every epoch run."""
    cached = isinstance(teacher, torch.Tensor)
    tensors = (x_train, y_train, teacher) if cached else (x_train, y_train)
    train_loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size,
                              sampler=SameShuffle(len(x_train), seed))
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    curve: list[float] = []
    for epoch in range(epochs):
        model.train()
        running_loss = 0.0
        for batch in train_loader:
            x, y = batch[0], batch[1]
            if cached:
                soft = batch[2]
            elif teacher is not None:
                with torch.no_grad():
                    soft = teacher(x)
            else:
                soft = None
            optimizer.zero_grad()
            loss = loss_fn(model(x), soft, y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(dim=1) == y).sum().item()
        curve.append(correct / len(y_val))
        if report is not None:
            report(epoch, curve[-1])
        if patience is not None and epoch - curve.index(max(curve)) >= patience:
            break
    return curve


def common_kd_objective(spec: Spec, splits, teacher_model: nn.Module) -> Callable[[optuna.Trial], float]:
    """The same search as kdtune's objective (same parameters, loss, epochs, early stopping, pruning), trained
    the common way: DataLoader, teacher forward on every batch."""
    teacher_model.eval()

    # the benchmark's peer is the seed project's setting: grey images, one-layer MLP students
    assert (spec.student.family, spec.student.depth, splits.input_shape[0]) == ("mlp", 1, 1), spec.student
    architecture = Architecture.of(spec.student, splits.input_shape, splits.n_classes)
    size_bands = cut_bands(spec.search, architecture, n_parameters(teacher_model))

    def objective(trial: optuna.Trial) -> float:
        band = assign_band(trial, size_bands)  # the same size bands as kdtune's study
        config = suggest(trial, spec.search, trial.user_attrs.get("loss", spec.student.loss), band)  # control arms
        trial.set_user_attr("loss", config.loss)  # as kdtune's objective records it: the front reads it
        torch.manual_seed(spec.seed)
        model = StudentMLP(splits.input_shape, splits.n_classes, config.width)

        def loss_fn(logits, soft, labels):
            return LOSSES[config.loss](logits, soft, labels, temperature=config.temperature,
                                       label_weight=config.label_weight)

        n_epochs = 0

        def report(epoch: int, val_accuracy: float) -> None:
            nonlocal n_epochs
            n_epochs = epoch + 1
            trial.report(val_accuracy, epoch)
            if trial.should_prune():
                trial.set_user_attr("n_epochs", n_epochs)
                raise optuna.TrialPruned()

        student = spec.student
        curve = naive_fit(model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, loss_fn=loss_fn,
                          epochs=student.max_epochs, batch_size=student.batch_size,
                          learning_rate=student.learning_rate, seed=spec.seed, teacher=teacher_model,
                          patience=student.patience_epochs, report=report)
        trial.set_user_attr("n_epochs", n_epochs)
        return max(curve)

    return objective
