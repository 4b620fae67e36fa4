"""kdtune: tune knowledge distillation (temperature, lambda, student width) with a pruned Optuna study."""

from kdtune.data import Dataset, Splits, prepare
from kdtune.models import StudentMLP, TeacherCNN
from kdtune.spec import Spec, SpecError, load_spec

__all__ = ["Dataset", "Spec", "SpecError", "Splits", "StudentMLP", "TeacherCNN", "load_spec", "prepare"]
