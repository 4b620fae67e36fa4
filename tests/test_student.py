"""The student: its user-facing names, the reference configuration, its families and size, and its training."""

import pytest
import torch
from conftest import CPU_FP32

from kdtune import student
from kdtune.models import StudentMLP, n_parameters
from kdtune.spec import SearchSpec, SpecError, StudentSpec
from kdtune.student import REFERENCE, StudentConfig
from kdtune.train import StopTraining
from kdtune.transfer import StudentData


def test_params_carry_the_user_facing_names_and_come_back():
    config = StudentConfig(temperature=3.0, label_weight=0.4, width=100, loss="reference")
    assert config.as_params() == {"temperature": 3.0, "lambda": 0.4, "width": 100, "loss": "reference"}
    assert StudentConfig.from_params(config.as_params()) == config


def test_lambda_one_is_the_student_trained_alone():
    assert REFERENCE.distils and not StudentConfig(3.0, 1.0, 100).distils


def test_the_reference_is_the_seed_project_s_configuration():
    assert REFERENCE == StudentConfig(temperature=10.0, label_weight=0.5, width=512, loss="reference")


def test_a_configuration_is_within_a_search_space_only_inside_every_range():
    search = SearchSpec()
    assert REFERENCE.within(search)
    assert not StudentConfig(10.0, 0.5, 4096).within(search) and not StudentConfig(0.5, 0.5, 512).within(search)


@pytest.mark.parametrize("width", [1, 16, 512, 2048])
def test_the_parameter_count_is_the_built_model_s(width):
    config = StudentConfig(4.0, 0.5, width)
    assert student.n_parameters(config, (28, 28), 10) == n_parameters(StudentMLP((28, 28), 10, width))
    assert student.n_parameters(config, (28, 28), 10) == (28 * 28 + 1) * width + (width + 1) * 10


def test_counting_parameters_leaves_the_random_state_alone():
    """The next student's initial weights come from the global RNG: counting must not draw from it."""
    before = torch.random.get_rng_state()
    student.n_parameters(REFERENCE, (28, 28), 26)
    assert torch.equal(before, torch.random.get_rng_state())


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(SpecError, match=r"student family must be one of \['mlp'\], but got 'cnn'"):
        student.build(REFERENCE, (28, 28), 10, family="cnn")


def test_a_stopped_student_comes_back_with_its_result():
    """What a pruned trial records: the student's curve and epochs up to the pruner's verdict."""
    torch.manual_seed(0)
    n = 60
    data = StudentData(torch.rand(n, 1, 8, 8), torch.randint(0, 3, (n,)), torch.randn(n, 3), torch.rand(n, 1, 8, 8),
                       torch.randint(0, 3, (n,)), (8, 8), 3)

    def prune_at_second_epoch(epoch, val_accuracy):
        if epoch == 1:
            raise StopTraining(f"pruned after epoch {epoch + 1}")

    _, result = student.train(StudentConfig(2.0, 0.5, 16), StudentSpec(max_epochs=5, batch_size=32), data, seed=0,
                              compute=CPU_FP32, report=prune_at_second_epoch)
    assert result.stopped_early == "pruned after epoch 2" and result.n_epochs == len(result.val_curve) == 2
