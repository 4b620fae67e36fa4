"""The students' training set — the transfer set of the recipe — and the data a trial may see.

By default students learn from every training image with its label. The spec's [transfer] section can give
them labels for only a stratified, seeded subset (`labelled`), and can add the other training images with
their labels withheld (`unlabelled = true`), so that only the teacher's soft targets teach on them: the
common real case of a big model and scarce labels. The teacher and the validation split never change.
A student without distillation (lambda = 1) trains on the labelled images only: the fair counterfactual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdtune.data import Splits, stratified_split
from kdtune.losses import UNLABELLED
from kdtune.spec import TransferSpec


@dataclass(frozen=True)
class StudentData:
    """Tensors on the device for training and validating students; no test images."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # UNLABELLED where the label is withheld
    teacher_logits: torch.Tensor  # aligned with x_train
    x_val: torch.Tensor
    y_val: torch.Tensor
    input_shape: tuple[int, ...]
    n_classes: int

    @classmethod
    def build(cls, splits: Splits, teacher_train_logits: torch.Tensor, transfer: TransferSpec, seed: int,
              device: torch.device) -> StudentData:
        labelled, unlabelled = labelled_indices(splits.y_train.numpy(), transfer.labelled, seed)
        labels = splits.y_train.clone()
        labels[torch.from_numpy(unlabelled)] = UNLABELLED
        keep = torch.arange(len(labels)) if transfer.unlabelled else torch.from_numpy(labelled)
        return cls(splits.x_train[keep].to(device), labels[keep].to(device), teacher_train_logits[keep].to(device),
                   splits.x_val.to(device), splits.y_val.to(device), splits.input_shape, splits.n_classes)

    def labelled_only(self) -> StudentData:
        labelled = self.y_train != UNLABELLED
        if bool(labelled.all()):
            return self
        return StudentData(self.x_train[labelled], self.y_train[labelled], self.teacher_logits[labelled],
                           self.x_val, self.y_val, self.input_shape, self.n_classes)


def labelled_indices(labels: np.ndarray, labelled: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, withheld) indices: `labelled` is a fraction (<= 1) or a count (> 1), taken per class."""
    if labelled >= len(labels) or labelled == 1.0:
        return np.arange(len(labels)), np.array([], dtype=np.int64)
    fraction = labelled if labelled < 1.0 else labelled / len(labels)
    withheld, kept = stratified_split(labels, fraction, seed)
    return kept, withheld
