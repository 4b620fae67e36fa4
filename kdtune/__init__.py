"""kdtune: tune knowledge distillation (temperature, lambda, student width) with a pruned Optuna study."""

from kdtune.data import Dataset, Splits, prepare
from kdtune.models import StudentCNN, StudentMLP, TeacherCNN
from kdtune.spec import Spec, SpecError, load_spec
from kdtune.student import Architecture

__all__ = ["Architecture", "Dataset", "Spec", "SpecError", "Splits", "StudentCNN", "StudentMLP", "TeacherCNN",
           "load_spec", "prepare"]
