"""Distillation losses: pure functions of (student logits, teacher logits, labels).

`label_weight` is the user-facing `lambda`: the weight of the hard-label cross-entropy, taken over the
labelled images of the batch only; the soft term covers every image.
"""

import torch
import torch.nn.functional as F

# The label of a training image whose label is withheld from the student (see kdtune/transfer.py).
UNLABELLED = -1


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows of the batch; 0 when none is labelled.

    Summed and divided on the device, not filtered by a boolean mask, to avoid a host sync per batch.
    """
    n_labelled = (labels != UNLABELLED).sum().clamp(min=1)
    return F.cross_entropy(logits, labels, ignore_index=UNLABELLED, reduction="sum") / n_labelled


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)), batch mean."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                temperature: float, label_weight: float) -> torch.Tensor:
    """lambda * CE(y, z_s) + (1 - lambda) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch-mean.

    The T^2 factor (Hinton et al. 2015, arXiv 1503.02531, section 2) keeps the soft term's gradients on the
    same scale as the label term whatever T is, so `lambda` means the same thing at T=2 and at T=20.
    KL uses reduction="batchmean": "mean" would also divide by the class count, silently shrinking the term.
    """
    hard = label_cross_entropy(student_logits, labels)
    if label_weight == 1.0:
        return hard
    soft = soft_kl(student_logits, teacher_logits, temperature)
    return label_weight * hard + (1.0 - label_weight) * temperature**2 * soft


def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                   temperature: float, label_weight: float) -> torch.Tensor:
    """lambda * CE(y, z_s) + CE(softmax(z_t/T), softmax(z_s/T)): the seed project's form, to reproduce it.

    No T^2 and no (1 - lambda): at T=10 its soft gradients are ~100x weaker than Hinton's, and lambda=1 still
    distils. Only use it to compare against the seed's numbers.
    """
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    soft = -(soft_targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()
    return label_weight * label_cross_entropy(student_logits, labels) + soft


LOSSES = {"hinton": hinton_loss, "reference": reference_loss}
