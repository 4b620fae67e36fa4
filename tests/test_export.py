"""Shipping the student: `export` (ONNX, parity, card, budgets) and `predict`, on the session's tiny study."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import optuna
import optuna_dashboard
import pytest
import torch
from conftest import REPO, cli_in_process, write_png_claiming
from PIL import Image

from kdtune import export, model_card, runtime
from kdtune.budget import Budget
from kdtune.optuna_compat import live_trial
from kdtune.readers import DataError
from kdtune.spec import SpecError
from kdtune.student import Architecture

pytestmark = pytest.mark.skipif(bool(runtime.missing_packages()), reason="needs kdtune[export]")


@pytest.fixture(scope="module")
def exported(tiny_study, tmp_path_factory):
    """A copy of the session's tiny study (tuned and reported), exported once with the defaults:
    (working folder, spec, the export's result, the report, the folder written)."""
    source, spec, _ = tiny_study
    workdir = tmp_path_factory.mktemp("export") / "study"
    shutil.copytree(source, workdir)
    spec = workdir / spec.name  # its data path still names the session study's file, which nothing here writes
    result = cli_in_process("export", "--spec", str(spec), "--threads", "1", cwd=workdir)
    found = json.loads((workdir / "studies/tiny/report.json").read_text())
    return workdir, spec, result, found, workdir / "studies/tiny/export" / f"trial-{found['winner_trial']}"


def test_export_writes_a_student_that_onnx_runtime_runs_as_pytorch_does(exported):
    workdir, _, result, found, folder = exported
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "model_card.json", "student.json",
                                                        "student.onnx", "student.pt"]
    test = np.load(workdir / "tiny.npz")["x_test"]
    with torch.inference_mode():
        expected = runtime.FromRaw(export.rebuild(folder))(torch.from_numpy(test)).numpy()
    found_logits = runtime.logits(runtime.session(folder / export.ONNX, threads=1), test)
    assert np.abs(found_logits - expected).max() <= export.MAX_LOGIT_DIFFERENCE
    assert (found_logits.argmax(1) == expected.argmax(1)).all()
    # any batch size goes through, uint8 pixels as they are
    assert runtime.logits(runtime.session(folder / export.ONNX, threads=1), test[:1]).shape == (1, 10)


def test_the_card_s_figures_are_the_report_s(exported):
    _, _, _, found, folder = exported
    card = json.loads((folder / "model_card.json").read_text())
    band = next(b for b in found["front"] if b["winner_trial"] == found["winner_trial"])
    tuned, twin = band["rows"]["tuned"], band["rows"]["no_distillation"]
    seed_index = tuned["val_accuracy"].index(max(tuned["val_accuracy"]))  # the seed best on validation
    assert card["trial"] == found["winner_trial"] and card["seed"] == found["seeds"][seed_index]
    assert card["configuration"] == tuned["config"] and card["n_parameters"] == tuned["n_parameters"]
    assert card["test_accuracy"]["this_model"] == tuned["test_accuracy"][seed_index]
    assert card["test_accuracy"]["tuned"]["per_seed"] == tuned["test_accuracy"]
    assert card["test_accuracy"]["tuned"]["mean"] == pytest.approx(tuned["test_mean"])
    assert card["test_accuracy"]["no_distillation"]["per_seed"] == twin["test_accuracy"]
    assert card["test_accuracy"]["gain"] == band["gain"]
    assert card["test_accuracy"]["teacher"] == found["teacher"]["test_accuracy"]
    assert card["verdict"] == found["verdict"] and card["finding"] == band["finding"]
    assert card["data_fingerprint"] == found["data_fingerprint"]
    assert card["teacher"]["cache_id"] == found["teacher"]["cache_id"]
    assert set(card["latency"]) == {"pytorch", "onnxruntime"}
    assert "latency_ms_batch1_onnxruntime" in band["latency"]  # the report timed its band winners there too
    assert all(set(card["latency"][name]) == {"1", "256"} for name in card["latency"])
    assert card["parity"]["max_abs_logit_difference"] <= export.MAX_LOGIT_DIFFERENCE
    markdown = (folder / "MODEL_CARD.md").read_text()
    assert f"{100 * tuned['test_accuracy'][seed_index]:.2f}%" in markdown and "ONNX Runtime" in markdown


def test_predict_gives_the_report_s_test_accuracy_on_the_same_images(exported):
    workdir, _, _, _, folder = exported
    card = json.loads((folder / "model_card.json").read_text())
    result = cli_in_process("predict", "--model", str(folder), str(workdir / "tiny.npz"), "--out", "p.csv", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"Accuracy on the 100 labelled images: {100 * card['test_accuracy']['this_model']:.2f}%" in result.stdout
    image = Image.fromarray(np.load(workdir / "tiny.npz")["x_test"][0])  # one image file, as a user has it
    image.save(workdir / "first.png")
    single = cli_in_process("predict", "--model", str(folder), "first.png", cwd=workdir)
    assert single.returncode == 0, single.stderr
    assert single.stdout.splitlines()[0] == result.stdout.splitlines()[0]  # "image 0: class c (probability p)"
    rows = (workdir / "p.csv").read_text().splitlines()
    assert len(rows) == 101 and rows[0].startswith("image,predicted,p0")
    probabilities = np.array([[float(p) for p in row.split(",")[2:]] for row in rows[1:]])
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)


def test_the_export_is_on_the_trial_s_note_and_in_the_study_s_artifacts(exported):
    workdir, _, _, found, _ = exported
    the_study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/studies/tiny/study.db")
    winner = next(t for t in the_study.trials if t.number == found["winner_trial"])
    note = optuna_dashboard.get_note(live_trial(the_study, winner))
    assert "#### Exported" in note and "student.onnx" in note
    artifacts = optuna.artifacts.get_all_artifact_meta(the_study)
    assert {"student.onnx", "MODEL_CARD.md", "student.pt"} <= {a.filename for a in artifacts}


def test_a_student_that_fails_parity_is_not_written(exported, monkeypatch):
    workdir, spec, _, found, folder = exported
    before = (folder / "student.onnx").read_bytes()
    real = runtime.logits
    monkeypatch.setattr(runtime, "logits", lambda session, images: real(session, images) + 1e-3)
    monkeypatch.chdir(workdir)
    from kdtune import data, report
    from kdtune.spec import load_spec
    loaded = load_spec(spec)
    with pytest.raises(SpecError, match="nothing was written"):
        export.export(loaded, found, export.choose(report.read(loaded)), data.prepare(loaded.data, loaded.seed), folder)
    assert (folder / "student.onnx").read_bytes() == before  # the earlier export is untouched
    assert not list(folder.parent.glob("*.partial-*"))


def band(trial: int, n_parameters: int, val_mean: float, latency_ms: float, vals=(0.5, 0.7, 0.6)) -> dict:
    return {"winner_trial": trial, "winner_val_mean": val_mean,
            "latency": {"latency_ms_batch1": latency_ms, "latency_ms_batch1_onnxruntime": latency_ms * 2 / 3},
            "rows": {"tuned": {"n_parameters": n_parameters, "run_files": ["a", "b", "c"], "val_accuracy": list(vals),
                               "config": {"temperature": 2.0, "lambda": 0.5, "width": 8, "loss": "hinton"}}}}


REPORT = {"winner_trial": 30, "front": [band(10, 20_000, 0.80, 0.02), band(20, 60_000, 0.84, 0.03),
                                        band(30, 500_000, 0.86, 0.09)]}


@pytest.mark.parametrize("budget, trial, expected", [
    (Budget(), None, 30),  # the overall winner
    (Budget(max_params=100_000), None, 20),  # the best on validation within the budget
    (Budget(max_params=60_000), None, 20),  # the budget is inclusive
    (Budget(max_params=59_999), None, 10),
    (Budget(max_latency_ms=0.025), None, 10),
    (Budget(max_latency_ms=0.025, runtime="onnxruntime"), None, 20),  # ONNX Runtime: 60 k parameters at 0.02 ms
    (Budget(), 10, 10),  # a band winner by its trial
])
def test_export_chooses_the_band_winner_the_budget_admits(budget, trial, expected):
    chosen = export.choose(REPORT, budget, trial)
    assert chosen.band["winner_trial"] == expected
    assert chosen.seed_index == 1  # the seed with the best validation accuracy


@pytest.mark.parametrize("found, budget, trial, message", [
    (REPORT, Budget(max_params=10_000), None, "no student of the report has at most 10,000 parameters"),
    (REPORT, Budget(), 11, "trial 11 is not one of the report's band winners"),
    ({"front": [{"rows": {"tuned": {}}}]}, Budget(), None, "predates `kdtune export`"),
    (REPORT, Budget(max_params=100_000), 10, "give it without --max-params"),
    ({**REPORT, "front": [{**b, "latency": {"latency_ms_batch1": 0.01}} for b in REPORT["front"]]},
     Budget(max_latency_ms=1.0, runtime="onnxruntime"), None, "did not time its students in onnxruntime"),
])
def test_export_refuses_what_the_report_cannot_give(found, budget, trial, message):
    with pytest.raises(SpecError, match=message):
        export.choose(found, budget, trial)


def one_line_exit_2(result, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def test_export_without_a_report_says_to_run_it(workdir, tiny_spec):
    one_line_exit_2(cli_in_process("export", "--spec", str(tiny_spec()), cwd=workdir), "run `kdtune report` first")


def test_export_and_predict_without_the_extra_say_how_to_get_it(workdir, tiny_spec):
    code = ("import sys; from kdtune import runtime, cli; runtime.missing_packages = lambda: ['onnxruntime']; "
            "sys.exit(cli.main(sys.argv[1:]))")
    for args in (["export", "--spec", str(tiny_spec())], ["predict", "--model", ".", "x.npz"]):
        result = subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        one_line_exit_2(result, "needs onnxruntime", 'pip install "kdtune[export]"')


def test_export_to_an_unwritable_folder_and_to_a_budget_no_student_meets_exit_2(exported):
    workdir, spec, _, _, _ = exported
    (workdir / "a-file").write_text("")
    under_a_file = cli_in_process("export", "--spec", str(spec), "--out", str(workdir / "a-file" / "out"), cwd=workdir)
    one_line_exit_2(under_a_file, f"cannot write the export to {workdir / 'a-file' / 'out'} (Not a directory)",
                    "--out")
    assert ".partial" not in under_a_file.stderr  # the scratch folder beside it is kdtune's business
    one_line_exit_2(cli_in_process("export", "--spec", str(spec), "--max-params", "10", cwd=workdir),
                    "no student of the report has at most 10 parameters")


def test_export_never_empties_a_folder_that_is_not_an_export_and_replaces_its_own(exported):
    workdir, spec, _, found, folder = exported
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    one_line_exit_2(cli_in_process("export", "--spec", str(spec), "--out", str(mine), cwd=workdir), "holds other files")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    before = (folder / "model_card.json").read_text()
    again = cli_in_process("export", "--spec", str(spec), "--threads", "1", cwd=workdir)  # over the earlier export
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no scratch or old copy left
    assert json.loads((folder / "model_card.json").read_text())["created"] >= json.loads(before)["created"]


def test_predict_refuses_images_of_the_wrong_size_or_type(exported):
    workdir, _, _, _, folder = exported
    np.savez(workdir / "small.npz", images=np.zeros((2, 8, 8), np.uint8))
    np.savez(workdir / "float.npz", images=np.zeros((2, 28, 28), np.float32))
    np.savez(workdir / "none.npz", images=np.zeros((0, 28, 28), np.uint8))
    one_line_exit_2(cli_in_process("predict", "--model", str(folder), "small.npz", cwd=workdir), "(N, 28, 28)",
                    "(2, 8, 8)")
    one_line_exit_2(cli_in_process("predict", "--model", str(folder), "float.npz", cwd=workdir), "uint8")
    one_line_exit_2(cli_in_process("predict", "--model", str(folder), "none.npz", cwd=workdir), "N >= 1")
    one_line_exit_2(cli_in_process("predict", "--model", str(workdir), "small.npz", cwd=workdir), "no exported student")
    write_png_claiming(workdir / "bomb.png", 30000, 30000)  # a decompression bomb's header
    one_line_exit_2(cli_in_process("predict", "--model", str(folder), "bomb.png", cwd=workdir),
                    "bomb.png is too big to decode safely", "resize it")


@pytest.mark.parametrize("relabel, phrases", [
    (lambda y: np.array(["coat", "bag"])[y % 2], ("labels holds text ('coat', ...), not class numbers",)),
    (lambda y: np.where(y == 3, 10, y), ("label 10 is none of the 10 classes the student was trained on (0..9)",
                                         "give each image's class number 0..9, or leave the labels out")),
    (lambda y: np.where(y == 3, -1, y.astype(np.int64)), ("label -1 is none of the 10 classes",)),
    (lambda y: y + 1, ("label 10 is none of the 10 classes", "(these count from 1: subtract 1)")),
])
def test_predict_refuses_labels_that_are_no_class_of_the_student(exported, relabel, phrases):
    workdir, _, _, _, folder = exported
    test = np.load(workdir / "tiny.npz")
    np.savez(workdir / "labelled.npz", images=test["x_test"], labels=relabel(test["y_test"]))
    one_line_exit_2(cli_in_process("predict", "--model", str(folder), "labelled.npz", cwd=workdir), *phrases)


def test_the_card_speaks_of_the_chosen_seed():
    chosen_band = band(30, 500_000, 0.86, 0.09, vals=(0.5, 0.7, 0.6))
    chosen_band.update(band_label="301k-999k parameters", finding="distillation pays",
                       gain={"mean": 0.01, "ci95_low": 0.005, "ci95_high": 0.015})
    chosen_band["rows"]["tuned"].update(test_accuracy=[0.80, 0.82, 0.81], test_mean=0.81, test_std=0.01)
    chosen_band["rows"]["no_distillation"] = {"test_accuracy": [0.79, 0.81, 0.80], "test_mean": 0.80,
                                              "test_std": 0.01}
    found = {"study": "s", "winner_trial": 30, "seeds": [1, 2, 3], "front": [chosen_band], "verdict": "v",
             "front_verdict": "f", "data_fingerprint": "d", "created": "c", "versions": {"torch": "x"},
             "teacher": {"cache_id": "t", "n_parameters": 3, "test_accuracy": 0.9}}
    timed = {"1": {"median_ms": 0.1, "p95_ms": 0.2}, "256": {"median_ms": 1.0, "p95_ms": 2.0}}
    card_inputs = ({"n_images": 1, "max_abs_logit_difference": 0.0, "same_predictions": 1.0},
                   {"pytorch": timed, "onnxruntime": timed},
                   {"config": chosen_band["rows"]["tuned"]["config"], "class_names": None,
                    "architecture": Architecture("mlp", 1, (1, 28, 28), 10).as_record(),
                    "input": model_card.describe_input((1, 28, 28))}, 1000)
    card = model_card.card(found, export.choose(found), *card_inputs)
    assert card["seed"] == 2 and card["test_accuracy"]["this_model"] == 0.82  # the seed best on validation
    assert card["test_accuracy"]["this_model_val_accuracy"] == 0.7
    assert card["test_accuracy"]["tuned"]["ci95_low"] < 0.81 < card["test_accuracy"]["tuned"]["ci95_high"]
    assert "| this model (seed 2) | 82.00% |" in model_card.to_markdown(card)
    assert "autocast" not in model_card.to_markdown(card)  # a report that does not say so read them in fp32
    chosen_band["rows"]["tuned"]["precision"] = "bf16"
    card = model_card.card(found, export.choose(found), *card_inputs)
    assert card["test_accuracy"]["precision"] == "bf16" and "read in bf16 autocast" in model_card.to_markdown(card)


def test_an_image_file_is_read_in_the_student_s_colour_mode(tmp_path):
    from PIL import Image

    from kdtune import predict

    pixels = np.stack([np.full((5, 4), 10), np.full((5, 4), 200), np.full((5, 4), 60)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "one.png")
    as_colour, _ = predict.read_images(tmp_path / "one.png", colour=True)
    as_grey, _ = predict.read_images(tmp_path / "one.png")
    assert as_colour.shape == (1, 5, 4, 3) and np.array_equal(as_colour[0], pixels)
    assert as_grey.shape == (1, 5, 4)
    assert predict.check_samples(as_colour, (3, 5, 4), tmp_path).shape == (1, 5, 4, 3)
    with pytest.raises(DataError, match=r"must be \(N, 5, 4, 3\)"):
        predict.check_samples(as_grey, (3, 5, 4), tmp_path)


def test_predict_takes_images_with_their_channels_first_or_last_as_training_does(tmp_path):
    from kdtune import predict

    colour = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    assert np.array_equal(predict.check_samples(colour.transpose(0, 3, 1, 2), (3, 5, 4), tmp_path), colour)
    grey = colour[..., 0]
    assert np.array_equal(predict.check_samples(grey[..., None], (1, 5, 4), tmp_path), grey)  # (N, H, W, 1)
    assert np.array_equal(predict.check_samples(grey[:, None], (1, 5, 4), tmp_path), grey)  # (N, 1, H, W)
    with pytest.raises(DataError, match=r"must be \(N, 5, 4, 3\) or \(N, 3, 5, 4\).* but are \(3, 5, 4\)"):
        predict.check_samples(colour[..., 0].repeat(2, axis=0)[:3], (3, 5, 4), tmp_path)  # 3 grey images, not 1


def test_predict_reads_a_16_bit_grey_png_as_the_same_picture_at_8_bits(exported):
    from kdtune import predict

    workdir, _, _, _, folder = exported
    pixels = np.load(workdir / "tiny.npz")["x_test"][0]
    Image.fromarray(pixels).save(workdir / "8-bit.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(workdir / "16-bit.png")  # 255 -> 65535
    assert np.array_equal(predict.read_images(workdir / "16-bit.png")[0][0], pixels)
    assert np.array_equal(predict.read_images(workdir / "16-bit.png", colour=True)[0][0],
                          np.repeat(pixels[..., None], 3, axis=-1))
    eight, sixteen = (cli_in_process("predict", "--model", str(folder), name, cwd=workdir)
                      for name in ("8-bit.png", "16-bit.png"))
    assert eight.returncode == sixteen.returncode == 0, eight.stderr + sixteen.stderr
    assert sixteen.stdout == eight.stdout  # "image 0: class c (probability p)"


@pytest.mark.parametrize("dtype, mode", [(np.int32, "I"), (np.float32, "F")])
def test_an_image_whose_bit_depth_says_nothing_of_its_white_is_refused(tmp_path, dtype, mode):
    from kdtune import predict

    Image.fromarray(np.full((5, 4), 1000, dtype)).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=f"wide.tif holds {mode} pixels, whose white the file does not say"):
        predict.read_images(tmp_path / "wide.tif")


def test_an_npz_or_npy_named_in_upper_case_is_read_as_one(tmp_path):
    from kdtune import predict

    images = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    with (tmp_path / "IMAGES.NPZ").open("wb") as npz, (tmp_path / "IMAGES.NPY").open("wb") as npy:
        np.savez(npz, images=images, labels=np.array([0, 1]))  # given a name, savez and save would add .npz, .npy
        np.save(npy, images)
    found, labels = predict.read_images(tmp_path / "IMAGES.NPZ")
    assert np.array_equal(found, images) and labels.tolist() == [0, 1]
    assert np.array_equal(predict.read_images(tmp_path / "IMAGES.NPY")[0], images)


def test_predict_says_one_hot_labels_look_one_hot(tmp_path):
    from kdtune import predict

    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: labels looks one-hot, (3, 4): one column per class")):
        predict.check_labels(np.eye(4, dtype=np.uint8)[[0, 3, 1]], n_images=3, n_classes=4, where=tmp_path)
