"""Teachers that come from the user: a network of their own (trained here), weights (only evaluated), or logits
from a file; what identifies each in the cache key, and their bad inputs."""

import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CPU_FP32

from kdtune import data, teacher, teacher_sources
from kdtune.models import TeacherCNN
from kdtune.readers import DataError
from kdtune.spec import SpecError, load_spec
from kdtune.train import accuracy_of_logits

USER_MODULE = """
import torch

def small_cnn(input_shape, n_classes):
    channels, height, width = input_shape
    return torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * height * width, n_classes))
"""


@pytest.fixture
def tiny(tiny_spec, monkeypatch):
    """The tiny spec and its splits; user modules importable from the working directory, restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "user_teachers", raising=False)
    spec = load_spec(tiny_spec())
    return spec, data.prepare(spec.data, spec.seed)


def with_teacher(spec, **changes):
    return replace(spec, teacher=replace(spec.teacher, **changes))


def quiet(*args, **kwargs):
    return teacher.load_or_train(*args, **kwargs, echo=lambda _: None)


def write_logits(path, splits, *, train=None, test=None):
    """Logits in the file's row order: the training file's rows are x_train's and x_val's, interleaved."""
    n_train = len(splits.train_rows) + len(splits.val_rows)
    rng = np.random.default_rng(0)
    train = rng.standard_normal((n_train, splits.n_classes)).astype(np.float32) if train is None else train
    test = rng.standard_normal((len(splits.x_test), splits.n_classes)).astype(np.float32) if test is None else test
    np.savez(path, train=train, test=test)
    return train, test


def test_a_logits_file_is_the_whole_teacher_split_as_the_data(tiny, workdir, monkeypatch):
    spec, splits = tiny
    train, test = write_logits(workdir / "logits.npz", splits)
    monkeypatch.setattr(teacher_sources, "network", lambda *a: pytest.fail("a logits teacher built a network"))
    cached = quiet(with_teacher(spec, logits="logits.npz"), splits, CPU_FP32)
    # each split's rows are the file's rows of that split's images: a wrong pairing would fail here
    assert torch.equal(cached.logits["train"], torch.from_numpy(train[splits.train_rows]))
    assert torch.equal(cached.logits["val"], torch.from_numpy(train[splits.val_rows]))
    assert torch.equal(cached.logits["test"], torch.from_numpy(test))
    assert cached.val_accuracy == accuracy_of_logits(cached.logits["val"], splits.y_val)
    assert cached.n_parameters is None and not (cached.folder / teacher.WEIGHTS_FILE).exists()
    with pytest.raises(SpecError, match="given as logits: there is no network"):
        teacher.load_model(cached)
    assert teacher.load(cached.folder).cache_id == cached.cache_id  # the cache reads back without weights



def test_logits_rows_pair_with_the_files_samples(tiny, workdir):
    """Logits that are the one-hot of the data file's own labels, row for row: a teacher right on every sample
    only if each cached row is its sample's (train, val and test)."""
    spec, splits = tiny
    labels = np.load(spec.data.path)
    write_logits(workdir / "onehot.npz", splits, train=5 * np.eye(10, dtype=np.float32)[labels["y_train"]],
                 test=5 * np.eye(10, dtype=np.float32)[labels["y_test"]])
    cached = quiet(with_teacher(spec, logits="onehot.npz"), splits, CPU_FP32)
    assert cached.val_accuracy == 1.0
    for part in ("train", "val", "test"):
        assert torch.equal(cached.logits[part].argmax(1), getattr(splits, f"y_{part}"))


def test_the_cache_key_follows_the_logits_contents_not_the_file_name(tiny, workdir):
    spec, splits = tiny
    write_logits(workdir / "a.npz", splits)
    (workdir / "b.npz").write_bytes((workdir / "a.npz").read_bytes())
    write_logits(workdir / "c.npz", splits, train=np.zeros((len(splits.train_rows) + len(splits.val_rows), 10),
                                                            dtype=np.float32))
    ids = [teacher.cache_id(with_teacher(spec, logits=name), splits.fingerprint, CPU_FP32)
           for name in ("a.npz", "b.npz", "c.npz")]
    assert ids[0] == ids[1] != ids[2]
    assert ids[0] != teacher.cache_id(spec, splits.fingerprint, CPU_FP32)


@pytest.mark.parametrize("case, message", [
    ("rows", r"train must be float logits of shape \(\d+, 10\)"),
    ("classes", r"test must be float logits of shape \(\d+, 10\)"),
    ("nan", "train row 5 holds NaN or infinity"),
    ("integers", "must be float logits"),
    ("missing key", r"lacks \['test'\]"),
    ("not an archive", "is not a readable .npz archive"),
    ("no file", "does not exist"),
    ("an npy", "holds one array, as a .npy file does"),
])
def test_bad_logits_are_one_line_naming_the_file_and_nothing_is_cached(tiny, workdir, case, message):
    spec, splits = tiny
    n_train = len(splits.train_rows) + len(splits.val_rows)
    good = np.zeros((n_train, 10), dtype=np.float32)
    path = workdir / "bad.npz"
    if case == "rows":
        write_logits(path, splits, train=good[:-1])
    elif case == "classes":
        write_logits(path, splits, test=np.zeros((len(splits.x_test), 9), dtype=np.float32))
    elif case == "nan":
        good[5, 3] = np.nan
        write_logits(path, splits, train=good)
    elif case == "integers":
        write_logits(path, splits, train=good.astype(np.int64))
    elif case == "missing key":
        np.savez(path, train=good)
    elif case == "not an archive":
        path.write_bytes(b"not a zip file")
    elif case == "an npy":
        with path.open("wb") as file:  # np.save would add .npy to the name
            np.save(file, good)
    spec = with_teacher(spec, logits=str(path))
    with pytest.raises(DataError, match=message) as error:
        quiet(spec, splits, CPU_FP32)
    assert "\n" not in str(error.value) and "bad.npz" in str(error.value)
    assert not teacher.CACHE_ROOT.exists() or not any(teacher.CACHE_ROOT.iterdir())


def test_a_logits_file_is_said_to_be_cached_only_once_it_is_read(tiny, workdir):
    spec, splits = tiny
    (workdir / "bad.npz").write_bytes(b"not a zip file")
    said = []
    with pytest.raises(DataError, match="bad.npz is not a readable .npz archive"):
        teacher.load_or_train(with_teacher(spec, logits="bad.npz"), splits, CPU_FP32, echo=said.append)
    assert not any("cached" in line for line in said), said
    write_logits(workdir / "good.npz", splits)
    teacher.load_or_train(with_teacher(spec, logits="good.npz"), splits, CPU_FP32, echo=said.append)
    assert any("good.npz; they are cached in" in line for line in said), said


def test_logits_exclude_a_network_in_the_spec():
    with pytest.raises(SpecError, match="teacher.logits is the whole teacher"):
        load_spec(None, teacher={"logits": "l.npz", "weights": "w.pt"})
    with pytest.raises(SpecError, match="teacher.model must be"):
        load_spec(None, teacher={"model": "resnet"})


def test_weights_are_only_evaluated_never_trained(tiny, workdir, monkeypatch):
    spec, splits = tiny
    torch.manual_seed(3)
    network = TeacherCNN(splits.input_shape, splits.n_classes)
    torch.save(network.state_dict(), workdir / "teacher.pt")
    monkeypatch.setattr(teacher, "fit", lambda *a, **k: pytest.fail("a teacher given as weights was trained"))
    cached = quiet(with_teacher(spec, weights="teacher.pt"), splits, CPU_FP32)
    with torch.inference_mode():
        expected = network.eval()(splits.x_test)
    assert torch.allclose(cached.logits["test"], expected, atol=1e-5)
    assert cached.meta["n_epochs"] == 0 and cached.n_parameters == sum(p.numel() for p in network.parameters())
    assert torch.allclose(teacher.load_model(cached)(splits.x_val), cached.logits["val"], atol=1e-5)
    torch.save({"something": torch.zeros(3)}, workdir / "other.pt")
    torch.save(network, workdir / "pickled.pt")  # the whole module, the common mistake
    torch.save(torch.zeros(3), workdir / "tensor.pt")
    for wrong in ("other.pt", "pickled.pt", "tensor.pt"):
        with pytest.raises(DataError, match="is not a state_dict of this teacher network") as error:
            quiet(with_teacher(spec, weights=wrong), splits, CPU_FP32)
        assert "\n" not in str(error.value)


def test_weights_of_another_network_are_refused_saying_what_differs(tiny, workdir):
    spec, splits = tiny
    torch.save(TeacherCNN(splits.input_shape, 3).state_dict(), workdir / "three.pt")  # the data has 10 classes
    with pytest.raises(DataError) as error:
        quiet(with_teacher(spec, weights="three.pt"), splits, CPU_FP32)
    message = str(error.value)
    assert re.search(r"three.pt' is not a state_dict of this teacher network but another network's \(\S+ is "
                     r"\(3, \d+\) in the file but \(10, \d+\) here; 1 more of other shapes\); give the weights of the "
                     r"network teacher.model builds for this data, or leave teacher.weights out", message), message
    assert "torch.save(model, path)" not in message and "\n" not in message


def test_a_user_network_trains_here_and_its_source_keys_the_cache(tiny, workdir):
    spec, splits = tiny
    (workdir / "user_teachers.py").write_text(USER_MODULE)
    spec = with_teacher(spec, model="user_teachers:small_cnn", max_epochs=1)
    cached = quiet(spec, splits, CPU_FP32)
    assert cached.meta["n_epochs"] == 1 and cached.meta["teacher"]["model"] == "user_teachers:small_cnn"
    assert cached.n_parameters == (9 * 4 + 4) + (4 * 28 * 28 * 10 + 10)
    assert torch.allclose(teacher.load_model(cached).eval()(splits.x_val), cached.logits["val"], atol=1e-5)
    first = teacher.cache_id(spec, splits.fingerprint, CPU_FP32)
    (workdir / "user_teachers.py").write_text(USER_MODULE + "\n# edited\n")
    assert teacher.cache_id(spec, splits.fingerprint, CPU_FP32) != first  # an edited module is another teacher


def test_the_example_user_models_in_studies_build_and_run(monkeypatch):
    """studies/user_models.py, which the example specs name, as a user runs it from the repository's root."""
    from conftest import REPO

    from kdtune.spec import TeacherSpec
    from kdtune.student import Architecture

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))
    network = teacher_sources.network(TeacherSpec(model="studies.user_models:wide_cnn"), (3, 16, 16), 5)
    assert network(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    students = Architecture("studies.user_models:bottleneck_mlp", 1, (20,), 4)
    assert students.build(32)(torch.zeros(2, 20)).shape == (2, 4)
    assert students.n_parameters(32) == (20 * 32 + 32) + (32 * 8 + 8) + (8 * 4 + 4)


def test_a_user_network_must_give_one_logit_per_class(tiny, workdir):
    """An ImageNet head of 1000 would train without complaint and break every student after it."""
    spec, splits = tiny
    (workdir / "user_teachers.py").write_text(USER_MODULE + """
def imagenet_head(input_shape, n_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 1000))

def needs_colour(input_shape, n_classes):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(n_classes))

def features_not_logits(width, input_shape, n_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, width))
""")
    with pytest.raises(SpecError, match=r"gives outputs of shape \(2, 1000\).*must give logits of shape \(2, 10\)"):
        quiet(with_teacher(spec, model="user_teachers:imagenet_head"), splits, CPU_FP32)
    with pytest.raises(SpecError, match=r"needs_colour fails on a batch of shape \(2, 1, 28, 28\)"):
        quiet(with_teacher(spec, model="user_teachers:needs_colour"), splits, CPU_FP32)
    from kdtune.student import Architecture

    with pytest.raises(SpecError, match=r"student.family: user_teachers:features_not_logits gives outputs of shape "
                                        r"\(2, 8\)"):
        Architecture("user_teachers:features_not_logits", 1, (1, 28, 28), 10).build(8)
