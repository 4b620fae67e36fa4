"""How distillation went, measured on validation data: in one trial, does the student follow the teacher, is it
calibrated, and did it learn at all? Across the study, is the teacher ahead of the student at all?
"""

import sys

import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from tqdm import tqdm

from kdtune.losses import soft_kl

N_CALIBRATION_BINS = 15  # the usual choice (Guo et al. 2017, "On calibration of modern neural networks")
# A student whose best validation accuracy stays below 1.5x chance learnt nothing useful: its trial fails
# with that reason instead of entering the study as a (terrible) data point for the sampler.
CHANCE_MARGIN = 1.5


class StuckAtChance(RuntimeError):
    """The student's validation accuracy never rose clearly above chance."""


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of images on which the student's top-1 class is the teacher's."""
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()


def kl_at_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> float:
    """How far the student is from the soft targets: the soft term of the loss, without its weight."""
    return soft_kl(student_logits, teacher_logits, temperature).item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share of images."""
    confidence, predicted = F.softmax(logits, 1).max(1)
    correct = (predicted == labels).float()
    bins = torch.clamp((confidence * N_CALIBRATION_BINS).long(), max=N_CALIBRATION_BINS - 1)
    error = torch.zeros((), dtype=torch.float64)
    for b in bins.unique():
        members = bins == b
        error += members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return error.item()


def measure(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float) -> dict[str, float]:
    return {"teacher_agreement": round(agreement(student_logits, teacher_logits), 5),
            "kl_at_temperature": round(kl_at_temperature(student_logits, teacher_logits, temperature), 5),
            "calibration_error": round(expected_calibration_error(student_logits, labels), 5)}


def check_learnt(val_accuracy: float, n_classes: int) -> None:
    if val_accuracy < CHANCE_MARGIN / n_classes:
        raise StuckAtChance(f"validation accuracy stayed at chance ({val_accuracy:.4f}, chance is "
                            f"{1 / n_classes:.4f})")


class TeacherBehindWarning:
    """An Optuna callback that warns, once, when a student trained without distillation beats the teacher on
    validation: distilling from such a teacher cannot be expected to help, and the user should know before
    the study spends its budget (see the report's verdict for what to do)."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.warned or trial.state != TrialState.COMPLETE or trial.user_attrs.get("control") != "no_distillation":
            return  # before reading the study's attributes: a query, and this runs after every trial
        teacher_accuracy = study.user_attrs.get("teacher_val_accuracy")
        if teacher_accuracy is None or trial.value <= teacher_accuracy:
            return
        self.warned = True
        tqdm.write(f"warning: the student of width {trial.params['width']} trained without distillation reaches "
                   f"{trial.value:.4f} validation accuracy, above the teacher's {teacher_accuracy:.4f}: distilling "
                   "from this teacher cannot be expected to help. Consider a stronger teacher (more epochs, more "
                   "data) before spending the study's budget.", file=sys.stderr)
