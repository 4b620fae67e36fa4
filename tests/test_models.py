import pytest
import torch

from kdtune.models import StudentMLP, TeacherCNN, n_parameters
from kdtune.spec import SpecError


def test_teacher_has_the_seed_projects_parameter_count():
    assert n_parameters(TeacherCNN((28, 28), 26)) == 3_378_970


def test_student_has_the_seed_projects_parameter_count():
    assert n_parameters(StudentMLP((28, 28), 26, width=512)) == 415_258


@pytest.mark.parametrize("shape", [(28, 28), (10, 10), (32, 20), (8, 8), (9, 28), (4, 4)])
def test_models_follow_the_input_size_and_class_count(shape):
    x = torch.zeros(3, 1, *shape)
    assert TeacherCNN(shape, 7)(x).shape == (3, 7)
    assert StudentMLP(shape, 7, width=5)(x).shape == (3, 7)


def test_teacher_pads_only_sides_too_small_for_the_seed_architecture():
    """Sides >= 10 keep the seed's valid convolutions, so every teacher cached before padding existed loads."""
    seed = TeacherCNN((28, 28), 26)
    small = TeacherCNN((8, 8), 26)
    assert [m.padding for m in seed if isinstance(m, torch.nn.Conv2d)] == [(0, 0), (0, 0)]
    assert [m.padding for m in small if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (1, 1)]
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 26)
    seed_shapes = {name: p.shape for name, p in seed.state_dict().items()}
    small_shapes = {name: p.shape for name, p in small.state_dict().items()}
    assert seed_shapes.keys() == small_shapes.keys()
    assert all(seed_shapes[n] == small_shapes[n] for n in seed_shapes if n != "7.weight")  # only the dense input


def test_teacher_refuses_images_below_its_minimum_side():
    from kdtune.models import TEACHER_MIN_SIDE

    assert TEACHER_MIN_SIDE == 4
    TeacherCNN((4, 28), 10)
    with pytest.raises(SpecError, match="at least 4x4"):
        TeacherCNN((3, 28), 10)

