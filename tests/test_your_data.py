"""A user's own data, teacher and students, end to end through the CLI's commands: colour images with CNN
students, an image folder with two-layer MLP students, and feature vectors whose teacher is a logits file, with
students from the user's own module. Each goes through tune, report and (two of them) export and predict; the
fixtures are written here from the embedded data. The commands run in this process (`cli_in_process`): the
subprocess path and its signals are test_cli's, and a new interpreter per command cost ~3 s each here."""

import json

import numpy as np
import optuna
import pytest
import torch
from conftest import cli_in_process, write_tiny_npz
from PIL import Image

from kdtune import data
from kdtune.spec import load_spec
from kdtune.student import Architecture
from kdtune.train import accuracy_of_logits

SPEC = """
seed = 0
device = "cpu"
[data]
{data}
[teacher]
max_epochs = 1
batch_size = 64
{teacher}
[student]
max_epochs = 2
patience_epochs = 10
batch_size = 64
{student}
[search]
width = {width}
n_warmup_epochs = 0
[report]
n_seeds = 2
n_candidates = 1
"""
NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
USER_STUDENTS = """
import torch

def two_layers(width, input_shape, n_classes):
    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], width), torch.nn.ReLU(),
                               torch.nn.Linear(width, n_classes))
"""


def write_spec(workdir, name, *, data_lines, width, student="", teacher=""):
    path = workdir / f"{name}.toml"
    path.write_text(SPEC.format(data=data_lines, width=width, student=student, teacher=teacher))
    return path


def cli(workdir, *args):
    done = cli_in_process(*args, cwd=workdir)
    assert done.returncode == 0, (args, done.stderr[-2000:])
    return done


def trials_of(workdir, name):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}/study.db")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def colour(x):
    """Colour images (N, H, W, 3) whose three channels differ."""
    return np.stack([x, 255 - x, x // 2], axis=-1)


def halved(tiny, split):
    """The tiny data's images at 14x14: the tests' models train four times faster."""
    return tiny[f"x_{split}"][:, ::2, ::2]


def test_colour_images_with_cnn_students_tune_report_export_and_predict(workdir):
    tiny = np.load(write_tiny_npz(workdir / "grey.npz"))
    np.savez(workdir / "colour.npz", x_train=colour(halved(tiny, "train")), y_train=tiny["y_train"],
             x_test=colour(halved(tiny, "test")), y_test=tiny["y_test"])
    spec = write_spec(workdir, "colour", data_lines='format = "npz"\npath = "colour.npz"', width="[4, 16]",
                      student='family = "cnn"')
    cli(workdir, "tune", "--spec", str(spec), "--trials", "4")
    cnn = Architecture("cnn", 1, (3, 14, 14), 10)
    trials = trials_of(workdir, "colour")
    assert len(trials) == 4 and all(t.user_attrs["n_parameters"] == cnn.n_parameters(t.params["width"])
                                    for t in trials)
    assert not any(t.user_attrs.get("control") == "reference" for t in trials)  # the reference is an MLP

    cli(workdir, "report", "--spec", str(spec))
    found = json.loads((workdir / "studies/colour/report.json").read_text())
    assert set(found["rows"]) == {"tuned", "no_distillation"}
    assert all(b["rows"]["tuned"]["n_parameters"] == cnn.n_parameters(b["rows"]["tuned"]["config"]["width"])
               for b in found["front"])

    cli(workdir, "export", "--spec", str(spec))
    folder = next((workdir / "studies/colour/export").iterdir())
    card = json.loads((folder / "model_card.json").read_text())
    assert card["architecture"]["family"] == "cnn" and card["input"]["shape"] == [14, 14, 3]
    np.savez(workdir / "test.npz", images=colour(halved(tiny, "test")), labels=tiny["y_test"])
    shown = cli(workdir, "predict", "--model", str(folder), "test.npz").stdout
    # the graph takes the colour images as the user holds them and gives the accuracy the report measured
    assert f"Accuracy on the 100 labelled images: {100 * card['test_accuracy']['this_model']:.2f}%" in shown


def test_an_image_folder_with_two_layer_mlp_students_shows_its_class_names(workdir):
    tiny = np.load(write_tiny_npz(workdir / "grey.npz"))
    for split in ("train", "test"):
        for index, (image, label) in enumerate(zip(halved(tiny, split), tiny[f"y_{split}"])):
            folder = workdir / "images" / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")
    spec = write_spec(workdir, "folder", data_lines='format = "folder"\npath = "images"', width="[8, 64]",
                      student="depth = 2")
    cli(workdir, "tune", "--spec", str(spec), "--trials", "3")
    two_layers = Architecture("mlp", 2, (1, 14, 14), 10)
    assert all(t.user_attrs["n_parameters"] == two_layers.n_parameters(t.params["width"])
               for t in trials_of(workdir, "folder"))
    cli(workdir, "report", "--spec", str(spec))
    found = json.loads((workdir / "studies/folder/report.json").read_text())
    assert found["class_names"] == sorted(NAMES)  # labels follow the sorted folder names
    assert "Classes: ankle-boot, bag, coat, dress," in (workdir / "studies/folder/report.md").read_text()


def test_feature_vectors_with_a_logits_teacher_and_the_user_s_own_students(workdir):
    tiny = np.load(write_tiny_npz(workdir / "grey.npz"))
    rng = np.random.default_rng(0)
    features = {split: tiny[f"x_{split}"].reshape(len(tiny[f"x_{split}"]), -1)[:, ::8] / 255.0
                for split in ("train", "test")}  # 98 numbers per sample
    np.savez(workdir / "features.npz", x_train=features["train"], y_train=tiny["y_train"],
             x_test=features["test"], y_test=tiny["y_test"])

    def logits(labels):  # a teacher right on most samples, as if from another framework
        return (4 * np.eye(10)[labels] + rng.standard_normal((len(labels), 10))).astype(np.float32)

    np.savez(workdir / "teacher-logits.npz", train=logits(tiny["y_train"]), test=logits(tiny["y_test"]))
    (workdir / "my_students.py").write_text(USER_STUDENTS)
    spec = write_spec(workdir, "features", data_lines='format = "features"\npath = "features.npz"', width="[8, 64]",
                      teacher='logits = "teacher-logits.npz"', student='family = "my_students:two_layers"')
    shown = cli(workdir, "teacher", "--spec", str(spec)).stdout
    assert "not trained here: given as logits" in shown
    cli(workdir, "tune", "--spec", str(spec), "--trials", "3")
    trials = trials_of(workdir, "features")
    (workdir / "my_students.py").write_text(USER_STUDENTS.replace("torch.nn.ReLU()", "torch.nn.Tanh()"))
    edited = cli_in_process("tune", "--spec", str(spec), "--trials", "4", cwd=workdir)
    assert edited.returncode == 2 and "made with another version of my_students:two_layers" in edited.stderr
    (workdir / "my_students.py").write_text(USER_STUDENTS)
    # the user's module built them: (98 + 1) w + (w + 1) 10 parameters
    assert all(t.user_attrs["n_parameters"] == 109 * t.params["width"] + 10 for t in trials)
    cli(workdir, "report", "--spec", str(spec))
    found = json.loads((workdir / "studies/features/report.json").read_text())
    assert found["teacher"]["n_parameters"] is None
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        splits = data.prepare(load_spec(spec).data, 0)
    file_logits = np.load(workdir / "teacher-logits.npz")
    assert found["teacher"]["test_accuracy"] == accuracy_of_logits(torch.from_numpy(file_logits["test"]),
                                                                   splits.y_test)

    cli(workdir, "export", "--spec", str(spec))
    folder = next((workdir / "studies/features/export").iterdir())
    card = json.loads((folder / "model_card.json").read_text())
    assert card["input"]["dtype"] == "float32" and card["input"]["shape"] == [98]
    assert "given as logits" in (folder / "MODEL_CARD.md").read_text()
    np.save(workdir / "vectors.npy", features["test"])
    shown = cli(workdir, "predict", "--model", str(folder), "vectors.npy", "--show", "1").stdout
    assert shown.startswith("image 0: class ")


def test_a_teacher_written_out_as_logits_runs_the_same_study_as_the_built_in_teacher(tiny_spec, workdir):
    """`teacher --logits-out` and `[teacher] logits` round-trip: the same trials, value for value."""
    builtin = tiny_spec("builtin", search="control_arms = false")  # the arms would not distil: no teacher used
    shown = cli(workdir, "teacher", "--spec", str(builtin), "--logits-out", "teacher-logits.npz").stdout
    assert 'use it as [teacher] logits = "teacher-logits.npz"' in shown
    from_logits = workdir / "from_logits.toml"
    from_logits.write_text(builtin.read_text().replace("[teacher]\n", '[teacher]\nlogits = "teacher-logits.npz"\n'))
    for spec in (builtin, from_logits):
        cli(workdir, "tune", "--spec", str(spec), "--trials", "3")
    ran = {name: [(t.params, t.value, t.state) for t in trials_of(workdir, name)]
           for name in ("builtin", "from_logits")}
    assert ran["builtin"] == ran["from_logits"] and len(ran["builtin"]) == 3
    assert any(params["lambda"] < 1 for params, _, _ in ran["builtin"])
