"""The report: its statistics and verdict, and one real report on tiny data for what users rely on: the winner,
the seeds, the pairing of the gain and the saved runs (the end-to-end report through the CLI is in test_cli.py)."""

import shutil
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from conftest import CPU_FP32, TINY_SPEC, write_tiny_npz
from optuna.distributions import FloatDistribution, IntDistribution

from kdtune import bands, data, hardware, report, student, teacher
from kdtune.bands import Band
from kdtune.budget import Budget
from kdtune.report import mean_interval, pick_winner, twin_of, verdict, weak_teacher_warning
from kdtune.spec import Spec, load_spec
from kdtune.student import StudentConfig
from kdtune.train import accuracy


def test_identical_arms_give_a_zero_width_interval():
    assert mean_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)


def test_mean_interval_is_the_student_t_interval():
    mean, low, high = mean_interval([0.01, 0.02, 0.03])
    half = 4.302652729911275 * 0.01 / 3 ** 0.5  # t(0.975, df=2) * sd / sqrt(n)
    assert mean == pytest.approx(0.02) and (low, high) == pytest.approx((0.02 - half, 0.02 + half))


@pytest.mark.parametrize("gain, low, high, phrase", [
    (0.01, 0.004, 0.016, "Distillation pays"),
    (-0.01, -0.02, -0.001, "Distillation hurts"),
    (0.003, -0.002, 0.008, "No gain distinguishable from seed noise"),
])
def test_verdict_follows_the_interval(gain, low, high, phrase):
    said = verdict(gain, low, high, teacher_lead=0.02)
    assert said.startswith(phrase) and "teacher is +2.00 points ahead" in said


def test_the_no_distillation_twin_differs_only_in_lambda():
    tuned = StudentConfig(temperature=3.0, label_weight=0.4, width=100)
    twin = twin_of(tuned)
    assert (twin.temperature, twin.width, twin.label_weight, twin.loss) == (3.0, 100, 1.0, "hinton")


def test_winner_is_the_best_mean_over_seeds_and_ties_go_to_the_smaller_student():
    candidates = [{"trial": 0, "val_mean": 0.80, "n_parameters": 10},
                  {"trial": 1, "val_mean": 0.85, "n_parameters": 900},
                  {"trial": 2, "val_mean": 0.85, "n_parameters": 300}]
    assert pick_winner(candidates)["trial"] == 2


def test_verdict_when_the_winner_does_not_distil():
    assert verdict(0.0, 0.0, 0.0, teacher_lead=0.03, winner_distils=False).startswith(
        "No gain here: the best configuration on validation does not distil")


@pytest.mark.parametrize("gain, low, high, winner_distils", [
    (0.003, -0.002, 0.008, True), (-0.01, -0.02, -0.001, True), (0.0, 0.0, 0.0, False)])
def test_verdict_says_a_weaker_teacher_is_behind_and_cannot_be_expected_to_help(gain, low, high, winner_distils):
    said = verdict(gain, low, high, teacher_lead=-0.0224, winner_distils=winner_distils)
    assert ("The teacher is 2.24 points behind the student trained alone: distilling from this teacher cannot be "
            "expected to help.") in said
    assert "ahead" not in said and "unlabelled transfer images" not in said


def test_a_measured_gain_from_a_weaker_teacher_is_not_denied():
    said = verdict(0.01, 0.004, 0.016, teacher_lead=-0.0224)
    assert said.startswith("Distillation pays") and said.endswith("2.24 points behind the student trained alone.")


def test_the_weak_teacher_warning_comes_only_when_the_teacher_is_behind():
    assert weak_teacher_warning(0.0) is None and weak_teacher_warning(0.02) is None
    assert weak_teacher_warning(-0.005) == ("The teacher is 0.50 points behind the student trained alone: "
                                            "distilling from this teacher cannot be expected to help.")


# ------------------------------------------------------------------------------------ one real report

SEARCH_DISTRIBUTIONS = {"temperature": FloatDistribution(1.0, 20.0, log=True), "lambda": FloatDistribution(0.0, 1.0),
                        "width": IntDistribution(1, 512, log=True)}


@dataclass
class Evaluated:
    folder: Path  # the working directory the report ran in
    spec: Spec
    splits: data.Splits
    cached: teacher.CachedTeacher
    study: optuna.Study
    report: dict
    echoed: list[str]
    trained: list[tuple[StudentConfig, int, tuple]]  # every student.train call: (config, seed, (model, result))
    tested: list[int]  # the hidden width of every student whose accuracy the report measured on the test set

    def fresh_run(self, config: StudentConfig, seed: int) -> tuple:
        """The run the report trained for this config and seed."""
        [run] = [run for c, s, run in self.trained if (c, s) == (config, seed)]
        return run

    def test_accuracy(self, config: StudentConfig, seed: int) -> float:
        model, _ = self.fresh_run(config, seed)
        return accuracy(model, self.splits.x_test, self.splits.y_test)


def add_trial(study: optuna.Study, value: float, config: StudentConfig, band: int | None = None) -> None:
    """A finished trial of `config`, recorded with `value` as if the search had measured it."""
    params = config.as_params()
    study.add_trial(optuna.trial.create_trial(
        params={name: params[name] for name in SEARCH_DISTRIBUTIONS}, distributions=SEARCH_DISTRIBUTIONS,
        value=value, user_attrs={"loss": config.loss, "n_parameters": 795 * config.width + 10,  # 28x28, 10 classes
                                 **({} if band is None else {"band": band})}))


def evaluate_recording(folder: Path, study: optuna.Study) -> Evaluated:
    """The report of `study` on tiny data (2 seeds, 2 epochs, 3 candidates per band), recording every
    student.train call."""
    npz = write_tiny_npz(folder / "tiny.npz", n_test_per_class=50)  # 500 test images: per-seed accuracies differ
    spec_path = folder / "tiny.toml"
    spec_path.write_text(TINY_SPEC.format(path=npz, student_epochs=2, width="[8, 64]", pruner="median",
                                          n_startup_trials=5, search="") + "n_candidates = 3\n")
    trained, echoed, tested = [], [], []
    train_student = student.train
    test_accuracy = report.accuracy

    def recording_test_accuracy(model, x, y, *args):
        assert x.shape[0] == 500  # only the test set is measured here: the tiny data has 500 test images
        tested.append(model[1].out_features)
        return test_accuracy(model, x, y, *args)

    def recording_train_student(config, architecture, schedule, student_data, seed, compute, **options):
        run = train_student(config, architecture, schedule, student_data, seed, compute, **options)
        trained.append((config, seed, run))
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(student, "train", recording_train_student)
        patch.setattr(report, "accuracy", recording_test_accuracy)
        spec = load_spec(spec_path)
        splits = data.prepare(spec.data, spec.seed)
        cached = teacher.load_or_train(spec, splits, CPU_FP32, echo=lambda _: None)
        result = report.evaluate(spec, splits, cached, study, CPU_FP32, echo=echoed.append)
    return Evaluated(folder, spec, splits, cached, study, result, echoed, trained, tested)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Evaluated:
    """A report over a study made before size bands (one band), whose recorded values rank its trials against
    what training gives: a 2-unit student recorded at 0.99, a 64-unit one at 0.5, and the seed project's
    configuration at 0.3, which is also the report's reference arm."""
    study = optuna.create_study(direction="maximize")
    add_trial(study, 0.99, StudentConfig(temperature=4.0, label_weight=0.5, width=2))
    add_trial(study, 0.5, StudentConfig(temperature=4.0, label_weight=0.5, width=64))
    add_trial(study, 0.3, student.REFERENCE)
    return evaluate_recording(tmp_path_factory.mktemp("report"), study)


BANDS = [Band(0, 1, 20, 795 * 1 + 10, 795 * 20 + 10), Band(1, 21, 64, 795 * 21 + 10, 795 * 64 + 10)]


@pytest.fixture(scope="module")
def banded(tmp_path_factory) -> Evaluated:
    """A report over a study of two size bands, each with two distilling trials and one trained alone."""
    study = optuna.create_study(direction="maximize")
    bands.record(study, BANDS)
    for value, config in ((0.99, StudentConfig(4.0, 0.5, 2)), (0.6, StudentConfig(2.0, 0.3, 16)),
                          (0.5, StudentConfig(1.0, 1.0, 12)), (0.7, StudentConfig(4.0, 0.5, 64)),
                          (0.4, StudentConfig(8.0, 0.2, 24)), (0.3, StudentConfig(1.0, 1.0, 40))):
        add_trial(study, value, config, band=int(config.width > 20))
    return evaluate_recording(tmp_path_factory.mktemp("banded"), study)


def test_each_band_is_judged_by_its_own_trials_its_twin_and_its_paired_gain(banded):
    front = banded.report["front"]
    assert [b["band"] for b in front] == [0, 1]
    seeds = banded.report["seeds"]
    for found, band in zip(front, BANDS):
        in_band = [t for t in banded.study.trials if t.user_attrs["band"] == band.index]
        fresh_mean = {t.number: statistics.fmean(banded.fresh_run(StudentConfig.from_trial(t), seed)[1].val_accuracy
                                                 for seed in seeds) for t in in_band}
        assert found["winner_trial"] == max(fresh_mean, key=fresh_mean.get)  # among its own band's trials only
        tuned = StudentConfig.from_params(found["rows"]["tuned"]["config"])
        twin = StudentConfig.from_params(found["rows"]["no_distillation"]["config"])
        assert band.holds(tuned.width) and (twin.width, twin.label_weight) == (tuned.width, 1.0)
        tuned_tests = [banded.test_accuracy(tuned, seed) for seed in seeds]
        twin_tests = [banded.test_accuracy(twin, seed) for seed in seeds]
        assert found["gain"]["paired_differences"] == pytest.approx([a - b for a, b in zip(tuned_tests, twin_tests)])
        assert found["latency"]["latency_ms_batch1"] > 0
    overall = max(front, key=lambda b: b["winner_val_mean"])
    assert banded.report["winner_trial"] == overall["winner_trial"]
    assert banded.report["rows"]["tuned"] == overall["rows"]["tuned"]
    [read] = banded.study.user_attrs["test_reads"]
    assert len(read["configs"]) == 2 * len(front) + 1  # each band's winner and twin, and the reference
    # and the test set was read for those and nothing else: each band's winner and twin (the same width), and
    # the reference, once per seed
    winner_widths = [StudentConfig.from_params(b["rows"]["tuned"]["config"]).width for b in front]
    assert Counter(banded.tested) == Counter({width: 2 * len(seeds) for width in winner_widths}) + Counter(
        {student.REFERENCE.width: len(seeds)})
    markdown = report.to_markdown(banded.report)
    assert all(b.label in markdown for b in BANDS) and "**Verdict by size.** Distillation pays in" in markdown


def test_the_winner_is_the_best_mean_over_fresh_seeds_not_the_best_search_value(evaluated):
    candidates = {trial.number: StudentConfig.from_trial(trial) for trial in evaluated.study.trials}
    fresh_mean = {number: statistics.fmean(evaluated.fresh_run(config, seed)[1].val_accuracy
                                           for seed in evaluated.report["seeds"])
                  for number, config in candidates.items()}
    best_fresh = max(fresh_mean, key=fresh_mean.get)
    assert best_fresh != evaluated.study.best_trial.number  # else this report could not tell the two apart
    assert evaluated.report["winner_trial"] == best_fresh


def test_the_gain_pairs_the_tuned_and_twin_runs_of_each_seed(evaluated):
    tuned, twin = (StudentConfig.from_params(evaluated.report["rows"][arm]["config"])
                   for arm in ("tuned", "no_distillation"))
    seeds = evaluated.report["seeds"]
    tuned_tests = [evaluated.test_accuracy(tuned, seed) for seed in seeds]
    twin_tests = [evaluated.test_accuracy(twin, seed) for seed in seeds]
    assert twin_tests != twin_tests[::-1]  # else a pairing across seeds would go unseen
    assert evaluated.report["rows"]["tuned"]["test_accuracy"] == pytest.approx(tuned_tests)
    assert evaluated.report["rows"]["no_distillation"]["test_accuracy"] == pytest.approx(twin_tests)
    assert evaluated.report["gain"]["paired_differences"] == pytest.approx(
        [t - n for t, n in zip(tuned_tests, twin_tests)])


def test_the_report_never_trains_with_the_search_seed(evaluated):
    seeds = evaluated.report["seeds"]
    assert len(set(seeds)) == evaluated.spec.report.n_seeds and evaluated.spec.seed not in seeds
    assert {seed for _, seed, _ in evaluated.trained} == set(seeds)


def test_a_first_report_trains_each_run_once_and_calls_none_from_an_earlier_report(evaluated):
    configs = [c["config"] for c in evaluated.report["candidates"]]
    assert evaluated.report["rows"]["reference"]["config"] in configs  # a candidate that is also an arm
    assert not [line for line in evaluated.echoed if "earlier report" in line]
    trained_keys = [(config, seed) for config, seed, _ in evaluated.trained]
    assert len(trained_keys) == len(set(trained_keys))


@pytest.mark.parametrize("from_before_sizes", [False, True], ids=["auto", "auto-study-recorded-bf16"])
def test_under_auto_each_student_of_a_report_trains_and_is_tested_in_its_own_precision(evaluated, tmp_path,
                                                                                        monkeypatch, from_before_sizes):
    """On a host with native bf16, `auto` trains the narrow students (2 and 64 units: fp32) as an fp32 report
    did, so their saved runs serve it, and the reference (512 units: bf16) afresh, in bf16; each is read on
    the test set in its own precision. The budget keeps the reference out of the front: a narrow winner. An
    auto study begun before auto went by size recorded plain bf16: all its students train in bf16."""
    shutil.copytree(evaluated.folder, tmp_path / "copy")  # the fixture's saved runs stay as they were
    monkeypatch.chdir(tmp_path / "copy")
    the_study = optuna.create_study(direction="maximize")  # the fixture's study stays as it was
    the_study.add_trials(evaluated.study.get_trials())
    if from_before_sizes:
        the_study.set_user_attr("precision", "bf16")
    by_size = hardware.Compute(CPU_FP32.device, torch.bfloat16, by_student_size=True)
    trained, tested = [], []
    fit, test_accuracy = student.fit, report.accuracy

    def recording_fit(model, *args, autocast_dtype, **options):
        trained.append((model[1].out_features, autocast_dtype))
        return fit(model, *args, autocast_dtype=autocast_dtype, **options)

    def recording_test_accuracy(model, x, y, autocast_dtype=None):
        tested.append((model[1].out_features, autocast_dtype))
        return test_accuracy(model, x, y, autocast_dtype)

    monkeypatch.setattr(student, "fit", recording_fit)
    monkeypatch.setattr(report, "accuracy", recording_test_accuracy)
    found = report.evaluate(evaluated.spec, evaluated.splits, evaluated.cached, the_study, by_size,
                            echo=lambda _: None, budget=Budget(max_params=795 * 64 + 10))
    assert found["rows"]["reference"]["precision"] == "bf16"  # what the card tells the user
    assert found["rows"]["tuned"]["precision"] == ("bf16" if from_before_sizes else "fp32")
    if from_before_sizes:  # every student in bf16, as the study's trials were
        assert trained and {dtype for _, dtype in trained + tested} == {torch.bfloat16}
        return
    # fresh: the reference, and the 64-unit winner's twin, which the fp32 report never needed; the candidates'
    # runs came from the fp32 report
    n_seeds = evaluated.spec.report.n_seeds
    assert Counter(trained) == {(64, None): n_seeds, (512, torch.bfloat16): n_seeds}
    assert set(tested) >= {(512, torch.bfloat16)} and {dtype for width, dtype in tested if width < 512} == {None}
    assert {width for width, _ in tested} - {512}  # a narrow student was read too


def refuse_training(*args, **options):
    raise AssertionError("a resumed report retrained a student it had saved")


def test_a_resumed_report_loads_each_seed_its_own_saved_run(evaluated, monkeypatch):
    monkeypatch.chdir(evaluated.folder)
    saved = sorted(report.runs_folder(evaluated.spec).glob("*.pt"))
    assert len(saved) == len(evaluated.trained)  # one file per configuration and seed
    monkeypatch.setattr(student, "train", refuse_training)
    echoed = []
    resumed = report.evaluate(evaluated.spec, evaluated.splits, evaluated.cached, evaluated.study, CPU_FP32,
                              echo=echoed.append)
    n_seeds = len(evaluated.report["seeds"])
    assert echoed and all(f"({n_seeds} of {n_seeds} from an earlier report)" in line for line in echoed)
    for arm, row in resumed["rows"].items():
        config = StudentConfig.from_params(row["config"])
        assert row["test_accuracy"] == pytest.approx(
            [evaluated.test_accuracy(config, seed) for seed in resumed["seeds"]]), arm
        assert row["val_curves"] == [evaluated.fresh_run(config, seed)[1].val_curve for seed in resumed["seeds"]]


def test_a_budget_keeps_the_report_to_the_bands_and_candidates_within_it(banded, monkeypatch):
    monkeypatch.chdir(banded.folder)  # the runs the banded report kept: nothing is retrained
    within = report.evaluate(banded.spec, banded.splits, banded.cached, banded.study, CPU_FP32, echo=lambda _: None,
                             budget=Budget(max_params=BANDS[0].max_params))
    assert [b["band"] for b in within["front"]] == [0]
    assert all(c["n_parameters"] <= BANDS[0].max_params for c in within["candidates"])
    assert within["budget"] == f"at most {BANDS[0].max_params:,} parameters"


# ------------------------------------------------------------------------------- loss forms against Hinton's

def test_holm_adjusts_step_down_and_keeps_the_order_given():
    # sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    assert report.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_the_paired_p_value_is_the_paired_t_tests():
    from scipy.stats import ttest_1samp
    differences = [0.01, 0.03, -0.005, 0.02]
    assert report.paired_p_value(differences) == pytest.approx(ttest_1samp(differences, 0.0).pvalue)
    assert report.paired_p_value([0.0, 0.0]) == 1.0 and report.paired_p_value([0.01, 0.01]) == 0.0


def add_form_trial(study: optuna.Study, value: float, config: StudentConfig, band: int) -> None:
    """A finished trial of any loss form, its params under the names and ranges the study samples them with."""
    search = load_spec().search
    params, distributions = {"width": config.width}, {"width": SEARCH_DISTRIBUTIONS["width"]}
    for name, (r, log) in search.ranges_of(config.loss).items():
        params[student.optuna_name(config.loss, name)] = config.as_params()[name]
        distributions[student.optuna_name(config.loss, name)] = FloatDistribution(r.low, r.high, log=log)
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value, user_attrs={
        "loss": config.loss, "n_parameters": 795 * config.width + 10, "band": band}))


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> Evaluated:
    """Two bands whose top three trials use other loss forms than Hinton's, and whose one Hinton-loss trial
    ranks last: each band's winner is compared with that trial, retrained over the report's seeds."""
    study = optuna.create_study(direction="maximize")
    bands.record(study, BANDS)
    dkd = (("alpha", 1.0), ("beta", 8.0))
    for value, config in ((0.99, StudentConfig(4.0, 0.5, 8, "dkd", dkd)), (0.9, StudentConfig(2.0, 0.5, 12, "dist")),
                          (0.8, StudentConfig(1.0, 0.5, 16, "mse")), (0.1, StudentConfig(4.0, 0.5, 10)),
                          (0.9, StudentConfig(2.0, 0.5, 30, "lskd")), (0.8, StudentConfig(2.0, 0.5, 40, "dist")),
                          (0.7, StudentConfig(1.0, 0.5, 50, "mse")), (0.2, StudentConfig(4.0, 0.5, 24))):
        add_form_trial(study, value, config, band=int(config.width > 20))
    return evaluate_recording(tmp_path_factory.mktemp("forms"), study)


def test_each_bands_winner_of_another_form_is_compared_with_its_best_hinton_configuration_holm_corrected(forms):
    seeds, front = forms.report["seeds"], forms.report["front"]
    hinton_trials = {t.user_attrs["band"]: t for t in forms.study.trials if t.user_attrs["loss"] == "hinton"}
    for found in front:
        winner = StudentConfig.from_params(found["rows"]["tuned"]["config"])
        assert found["loss"] == winner.loss != "hinton"
        compared = found["vs_hinton"]
        hinton = StudentConfig.from_trial(hinton_trials[found["band"]])
        assert compared["trial"] == hinton_trials[found["band"]].number
        assert found["rows"]["best_hinton"]["config"] == hinton.as_params()
        assert compared["paired_differences"] == pytest.approx(
            [forms.test_accuracy(winner, seed) - forms.test_accuracy(hinton, seed) for seed in seeds])
        assert compared["n_compared"] == 2
    p_values = [report.paired_p_value(b["vs_hinton"]["paired_differences"]) for b in front]
    assert [b["vs_hinton"]["p_holm"] for b in front] == pytest.approx(report.holm(p_values))
    [read] = forms.study.user_attrs["test_reads"]
    assert {name for name in read["configs"] if name.endswith("best_hinton")} == {
        f"{b['band_label']}: best_hinton" for b in front}
    markdown = report.to_markdown(forms.report)
    assert "**Loss forms.** 2 of 2 band winners use another loss form than Hinton's" in markdown
    assert all(f"| {b['band_label']} | trial {b['winner_trial']} | {b['loss']}" in markdown for b in front)


def test_the_loss_verdict_says_plainly_when_no_form_beats_hintons():
    bands_found = [{"band_label": "a", "loss": "dist", "vs_hinton": {"paired_differences": [0.01, -0.01, 0.0],
                                                                     "mean": 0.0}},
                   {"band_label": "b", "loss": "hinton"}]
    report.compare_with_hinton(bands_found)
    said = report.loss_verdict(bands_found)
    assert said.startswith("1 of 2 band winners use another loss form than Hinton's (a: dist).")
    assert "None of them beats the band's best Hinton-loss configuration distinguishably" in said
    assert report.loss_verdict([{"band_label": "b", "loss": "hinton"}]) == "Every band's winner uses Hinton's loss."


def test_the_loss_verdict_names_apart_the_bands_where_a_form_beats_hintons_trails_it_or_neither():
    """Seen in a real report: "2 beat it (...)" listed all four bands, the two that did not among them."""
    ahead, level, behind = [0.010, 0.012, 0.011, 0.009, 0.013], [0.01, -0.01, 0.004, -0.006, 0.0], \
        [-0.010, -0.012, -0.011, -0.009, -0.013]
    bands_found = [{"band_label": label, "loss": "dist", "vs_hinton": {"paired_differences": d, "mean": sum(d) / 5}}
                   for label, d in (("a", ahead), ("b", level), ("c", ahead), ("d", behind))]
    report.compare_with_hinton(bands_found)
    said = report.loss_verdict(bands_found)
    beats = said.split("beats it in 2 (")[1].split(")")[0]
    trails = said.split("is behind it in 1 (")[1].split(")")[0]
    neither = said.split("is not distinguishable from it in 1 (")[1].split(")")[0]
    assert ("a:" in beats, "c:" in beats, "b:" in beats, "d:" in beats) == (True, True, False, False)
    assert trails.startswith("d:") and neither.startswith("b:")
