"""The student: its user-facing names, the reference configuration, its families and size, and its training."""

import sys

import pytest
import torch
from conftest import CPU_FP32

from kdtune import student
from kdtune.models import StudentCNN, StudentMLP, n_parameters
from kdtune.spec import SearchSpec, SpecError, StudentSpec, load_spec
from kdtune.student import REFERENCE, Architecture, StudentConfig
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


MLP = Architecture("mlp", 1, (1, 28, 28), 10)


@pytest.mark.parametrize("width", [1, 16, 512, 2048])
def test_the_parameter_count_is_the_built_model_s(width):
    assert MLP.n_parameters(width) == n_parameters(StudentMLP((1, 28, 28), 10, width))
    assert MLP.n_parameters(width) == (28 * 28 + 1) * width + (width + 1) * 10
    cnn = Architecture("cnn", 1, (3, 16, 16), 10)
    assert cnn.n_parameters(width) == n_parameters(StudentCNN((3, 16, 16), 10, width))


def test_counting_parameters_leaves_the_random_state_alone():
    """The next student's initial weights come from the global RNG: counting must not draw from it."""
    before = torch.random.get_rng_state()
    Architecture("cnn", 1, (1, 28, 28), 26).n_parameters(64)
    MLP.n_parameters(512)
    assert torch.equal(before, torch.random.get_rng_state())


def test_the_spec_s_family_and_depth_build_the_students():
    architecture = Architecture.of(StudentSpec(family="mlp", depth=3), (1, 8, 8), 4)
    assert sum(isinstance(m, torch.nn.Linear) for m in architecture.build(16)) == 4
    assert isinstance(Architecture.of(StudentSpec(family="cnn"), (3, 8, 8), 4).build(16), StudentCNN)


def test_a_user_family_is_called_with_width_input_shape_and_classes(tmp_path, monkeypatch):
    (tmp_path / "my_students.py").write_text(
        "import torch\n"
        "calls = []\n"
        "def tiny(width, input_shape, n_classes):\n"
        "    calls.append((width, input_shape, n_classes))\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[-1] * 4, n_classes))\n"
        "def not_a_model(width, input_shape, n_classes):\n"
        "    return 'a string'\n")
    monkeypatch.chdir(tmp_path)  # user modules are found from the working directory, as `python -m` finds them
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test, as is sys.modules
    monkeypatch.delitem(sys.modules, "my_students", raising=False)
    architecture = Architecture("my_students:tiny", 1, (4, 4), 3)
    assert architecture.n_parameters(7) == 4 * 4 * 3 + 3
    import my_students

    assert my_students.calls[-1] == (7, (4, 4), 3)
    record = architecture.as_record()
    assert record["family"] == "my_students:tiny" and len(record["source_sha256"]) == 64
    with pytest.raises(SpecError, match="returned str, but must return a torch.nn.Module"):
        Architecture("my_students:not_a_model", 1, (4, 4), 3).build(7)
    with pytest.raises(SpecError, match="has no function 'missing'"):
        Architecture("my_students:missing", 1, (4, 4), 3).build(7)
    with pytest.raises(SpecError, match="cannot import 'nowhere_to_be_found'.*ModuleNotFoundError"):
        Architecture("nowhere_to_be_found:f", 1, (4, 4), 3).build(7)


def test_the_spec_refuses_an_unknown_family_and_depth_outside_the_mlp():
    with pytest.raises(SpecError, match=r"student.family must be one of \['mlp', 'cnn'\] or"):
        load_spec(None, student={"family": "resnet"})
    with pytest.raises(SpecError, match="student.depth must be 1, 2 or 3 hidden layers of the mlp family"):
        load_spec(None, student={"family": "cnn", "depth": 2})
    with pytest.raises(SpecError, match="student.depth"):
        load_spec(None, student={"depth": 4})
    assert load_spec(None, student={"depth": 3}).student.depth == 3


def test_a_stopped_student_comes_back_with_its_result():
    """What a pruned trial records: the student's curve and epochs up to the pruner's verdict."""
    torch.manual_seed(0)
    n = 60
    data = StudentData(torch.rand(n, 1, 8, 8), torch.randint(0, 3, (n,)), torch.randn(n, 3), torch.rand(n, 1, 8, 8),
                       torch.randint(0, 3, (n,)), (1, 8, 8), 3)

    def prune_at_second_epoch(epoch, val_accuracy):
        if epoch == 1:
            raise StopTraining(f"pruned after epoch {epoch + 1}")

    _, result = student.train(StudentConfig(2.0, 0.5, 16), Architecture("mlp", 1, (1, 8, 8), 3),
                              StudentSpec(max_epochs=5, batch_size=32), data, seed=0, compute=CPU_FP32,
                              report=prune_at_second_epoch)
    assert result.stopped_early == "pruned after epoch 2" and result.n_epochs == len(result.val_curve) == 2


def test_the_spec_knows_every_built_in_family():
    from kdtune.spec import STUDENT_FAMILIES

    assert STUDENT_FAMILIES == tuple(student.FAMILIES)
