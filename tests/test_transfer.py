"""The transfer set: counts, stratification, withheld labels that never reach the loss, the fair baseline."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_FP32

from kdtune import data
from kdtune import transfer as transfer_module
from kdtune.losses import UNLABELLED, hinton_loss, label_cross_entropy
from kdtune.spec import DataSpec, StudentSpec, TransferSpec
from kdtune.student import Architecture, StudentConfig, train
from kdtune.transfer import StudentData, labelled_indices

CPU = torch.device("cpu")
MLP = Architecture("mlp", 1, (1, 28, 28), 10)


@pytest.fixture(scope="module")
def splits():
    return data.prepare(DataSpec(), seed=0)  # the embedded data: 540 training images per class


def fake_teacher_logits(splits):
    return F.one_hot(splits.y_train, splits.n_classes).float() * 4


@pytest.mark.parametrize("labelled, per_class", [(0.1, 54), (100.0, 10), (1.0, 540)])
def test_labelled_subset_counts_and_stratification(splits, labelled, per_class):
    kept, withheld = labelled_indices(splits.y_train.numpy(), labelled, seed=0)
    assert np.bincount(splits.y_train.numpy()[kept]).tolist() == [per_class] * 10
    assert len(kept) + len(withheld) == len(splits.y_train) and not np.intersect1d(kept, withheld).size


def test_withheld_images_keep_no_label(splits):
    student_data = StudentData.build(splits, fake_teacher_logits(splits), TransferSpec(0.1, unlabelled=True), 0, CPU)
    assert len(student_data.x_train) == 5400
    assert int((student_data.y_train == UNLABELLED).sum()) == 4860
    assert len(student_data.labelled_only().x_train) == 540
    without = StudentData.build(splits, fake_teacher_logits(splits), TransferSpec(0.1), 0, CPU)
    assert len(without.x_train) == 540 and torch.equal(without.y_train, student_data.labelled_only().y_train)


def test_withheld_labels_never_reach_the_loss(splits, monkeypatch):
    """Scramble the true labels of the withheld images: a distilled student must not change at all."""
    transfer = TransferSpec(0.1, unlabelled=True)
    kept, withheld = labelled_indices(splits.y_train.numpy(), 0.1, seed=0)
    # the same images are withheld in both worlds (stratifying on scrambled labels would pick others)
    monkeypatch.setattr(transfer_module, "labelled_indices", lambda *args: (kept, withheld))
    scrambled = splits.y_train.clone()
    scrambled[torch.from_numpy(withheld)] = (scrambled[torch.from_numpy(withheld)] + 3) % 10
    logits = fake_teacher_logits(splits)  # the teacher's view is the same in both worlds
    schedule = StudentSpec(max_epochs=2)
    results = []
    for labels in (splits.y_train, scrambled):
        student_data = StudentData.build(dataclasses.replace(splits, y_train=labels), logits, transfer, 0, CPU)
        model, result = train(StudentConfig(4.0, 0.5, 32), MLP, schedule, student_data, seed=1, compute=CPU_FP32)
        results.append((result.val_curve, model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_no_distillation_baseline_trains_on_the_labelled_images_only(splits):
    logits, schedule = fake_teacher_logits(splits), StudentSpec(max_epochs=2)
    curves = []
    for transfer in (TransferSpec(0.1, unlabelled=True), TransferSpec(0.1)):
        student_data = StudentData.build(splits, logits, transfer, 0, CPU)
        _, result = train(StudentConfig(4.0, 1.0, 32), MLP, schedule, student_data, seed=1, compute=CPU_FP32)
        curves.append(result.val_curve)
    assert curves[0] == curves[1]


def test_label_term_skips_unlabelled_rows_and_is_zero_without_labels():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(label_cross_entropy(logits, labels), expected)
    none = torch.full((4,), UNLABELLED)
    assert label_cross_entropy(logits, none).item() == 0.0
    soft_only = hinton_loss(logits, logits.flip(0), none, temperature=2.0, label_weight=0.5)
    assert torch.isfinite(soft_only) and soft_only.item() > 0
