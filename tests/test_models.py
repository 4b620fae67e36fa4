import pytest
import torch

from kdtune.models import StudentMLP, TeacherCNN, n_parameters, student_n_parameters
from kdtune.spec import SpecError


def test_teacher_has_the_seed_projects_parameter_count():
    assert n_parameters(TeacherCNN((28, 28), 26)) == 3_378_970


def test_student_has_the_seed_projects_parameter_count():
    assert n_parameters(StudentMLP((28, 28), 26, width=512)) == 415_258


@pytest.mark.parametrize("shape", [(28, 28), (10, 10), (32, 20)])
def test_models_follow_the_input_size_and_class_count(shape):
    x = torch.zeros(3, 1, *shape)
    assert TeacherCNN(shape, 7)(x).shape == (3, 7)
    assert StudentMLP(shape, 7, width=5)(x).shape == (3, 7)


def test_teacher_refuses_images_too_small_for_its_poolings():
    with pytest.raises(SpecError, match="at least 10x10"):
        TeacherCNN((9, 28), 10)


@pytest.mark.parametrize("width", [1, 16, 512, 2048])
def test_student_size_formula_matches_the_model(width):
    assert student_n_parameters((28, 28), 10, width) == n_parameters(StudentMLP((28, 28), 10, width))
