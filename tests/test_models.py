import pytest
import torch

from kdtune.models import StudentCNN, StudentMLP, TeacherCNN, n_parameters
from kdtune.spec import SpecError


def test_teacher_has_the_seed_projects_parameter_count():
    assert n_parameters(TeacherCNN((1, 28, 28), 26)) == 3_378_970


def test_student_has_the_seed_projects_parameter_count():
    assert n_parameters(StudentMLP((1, 28, 28), 26, width=512)) == 415_258


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 10, 10), (1, 32, 20), (1, 8, 8), (1, 9, 28), (1, 4, 4),
                                   (3, 32, 32), (3, 8, 8), (3, 5, 7)])
def test_models_follow_the_input_size_channels_and_class_count(shape):
    x = torch.zeros(3, *shape)
    assert TeacherCNN(shape, 7)(x).shape == (3, 7)
    assert StudentMLP(shape, 7, width=5)(x).shape == (3, 7)
    assert StudentCNN(shape, 7, width=4)(x).shape == (3, 7)


def test_colour_widens_only_the_first_layer_of_the_image_models():
    grey, colour = (1, 28, 28), (3, 28, 28)
    assert n_parameters(TeacherCNN(colour, 10)) - n_parameters(TeacherCNN(grey, 10)) == 2 * 9 * 64
    assert n_parameters(StudentCNN(colour, 10, 8)) - n_parameters(StudentCNN(grey, 10, 8)) == 2 * 9 * 8
    assert n_parameters(StudentMLP(colour, 10, 8)) - n_parameters(StudentMLP(grey, 10, 8)) == 2 * 784 * 8


def test_the_mlp_takes_feature_vectors_and_the_cnns_refuse_them_naming_the_way_out():
    assert StudentMLP((20,), 4, width=6)(torch.zeros(2, 20)).shape == (2, 4)
    for build in (lambda: TeacherCNN((20,), 4), lambda: StudentCNN((20,), 4, 6)):
        with pytest.raises(SpecError, match="feature vectors of length 20.*logits"):
            build()


def test_mlp_depth_adds_hidden_layers_and_depth_one_keeps_the_one_layer_names():
    one, two, three = (StudentMLP((1, 28, 28), 10, width=64, depth=d) for d in (1, 2, 3))
    assert list(one.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]  # saved students load as before
    assert n_parameters(two) - n_parameters(one) == n_parameters(three) - n_parameters(two) == 64 * 64 + 64
    assert sum(isinstance(m, torch.nn.Linear) for m in three) == 4


def test_the_student_cnn_has_its_documented_size():
    """conv(1->w) + conv(w->2w) + dense(2w * 7 * 7 -> 10) at 28x28, w = 32."""
    assert n_parameters(StudentCNN((1, 28, 28), 10, 32)) == (9 * 32 + 32) + (32 * 64 * 9 + 64) + (64 * 49 * 10 + 10) \
        == 50_186


def test_teacher_pads_only_sides_too_small_for_the_seed_architecture():
    """Sides >= 10 keep the seed's valid convolutions, so every teacher cached before padding existed loads."""
    seed = TeacherCNN((1, 28, 28), 26)
    small = TeacherCNN((1, 8, 8), 26)
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
    TeacherCNN((1, 4, 28), 10)
    with pytest.raises(SpecError, match="at least 4x4"):
        TeacherCNN((1, 3, 28), 10)

