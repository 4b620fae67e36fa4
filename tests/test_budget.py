"""Choosing within a size budget: `best --max-params N` / `--max-latency-ms X`, and report's candidates."""

import json

import optuna
import pytest
from conftest import cli_in_process

from kdtune import bands, front, study
from kdtune.bands import Band
from kdtune.budget import Budget
from kdtune.report import top_configurations
from kdtune.spec import SpecError

DISTRIBUTIONS = {"temperature": optuna.distributions.FloatDistribution(1.0, 20.0),
                 "lambda": optuna.distributions.FloatDistribution(0.0, 1.0),
                 "width": optuna.distributions.IntDistribution(8, 2048)}


# two size bands: up to 100 hidden units, and wider
BANDS = [Band(0, 8, 100, 795 * 8 + 10, 795 * 100 + 10), Band(1, 101, 2048, 795 * 101 + 10, 795 * 2048 + 10)]


def trial(value: float, width: int, latency_ms: float | None = None) -> optuna.trial.FrozenTrial:
    attrs = {"loss": "hinton", "n_parameters": 795 * width + 10, bands.TRIAL_KEY: int(width > 100)}
    if latency_ms is not None:
        attrs["latency_ms_batch1"] = latency_ms
    return optuna.trial.create_trial(params={"temperature": 2.0, "lambda": 0.5, "width": width}, value=value,
                                     distributions=DISTRIBUTIONS, user_attrs=attrs)


@pytest.fixture
def a_study():
    """The wider the student, the better and the slower, as in every study so far."""
    the_study = optuna.create_study(direction="maximize", study_name="sized")
    bands.record(the_study, BANDS)
    for value, width, latency in ((0.90, 2048, 0.20), (0.88, 512, 0.08), (0.85, 64, 0.02), (0.85, 32, 0.02)):
        the_study.add_trial(trial(value, width, latency))
    return the_study


def test_best_overall_and_best_within_a_budget(a_study):
    assert study.best(a_study)["width"] == 2048
    assert study.best(a_study, Budget(max_params=500_000))["width"] == 512
    assert study.best(a_study, Budget(max_latency_ms=0.05))["width"] == 32  # a tie on accuracy: the smaller
    assert study.best(a_study, Budget(max_params=500_000, max_latency_ms=0.05))["width"] == 32


def test_the_front_is_the_best_of_each_band_within_the_budget(a_study):
    front = study.best(a_study)["front"]
    assert [(e["band"], e["width"], e["n_complete"]) for e in front] == [(0, 32, 2), (1, 2048, 2)]  # ties: smaller
    assert front[1] == {"band": 1, "band_label": "80.3k-1.63M parameters", "min_params": 80_305,
                        "max_params": 1_628_170, "n_finished": 2, "n_complete": 2, "trial": 0, "width": 2048,
                        "n_parameters": 1_628_170, "latency_ms": 0.20, "latency_ms_onnxruntime": None,
                        "val_accuracy": 0.90, "temperature": 2.0, "lambda": 0.5, "loss": "hinton"}
    within = study.best(a_study, Budget(max_params=500_000))["front"]
    assert [(e["band"], e["width"]) for e in within] == [(0, 32), (1, 512)]
    assert [e["band"] for e in study.best(a_study, Budget(max_params=60_000))["front"]] == [0]


def test_a_band_whose_trials_were_all_pruned_has_no_front_entry_but_counts_them(a_study):
    for width in (16, 24):  # two more trials in band 0, pruned
        pruned = trial(0.5, width)
        a_study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, params=pruned.params, distributions=DISTRIBUTIONS,
            user_attrs=pruned.user_attrs, intermediate_values={0: 0.5}))
    [narrow, _] = study.best(a_study)["front"]
    assert (narrow["n_finished"], narrow["n_complete"]) == (4, 2)
    only_pruned = optuna.create_study(direction="maximize")
    bands.record(only_pruned, BANDS)
    only_pruned.add_trial(a_study.trials[-1])
    assert front.best_per_band(only_pruned) == []


def test_a_budget_no_trial_meets_says_what_the_study_holds(a_study):
    with pytest.raises(SpecError, match=r"no completed trial of study 'sized' has at most 1,000 parameters: the "
                                        r"smallest has 25,450 parameters and 0.02 ms at batch 1"):
        study.best(a_study, Budget(max_params=1_000))


def test_a_trial_without_a_latency_never_meets_a_latency_budget():
    assert not Budget(max_latency_ms=10.0).admits(trial(0.9, 16))
    assert Budget(max_params=100_000).admits(trial(0.9, 16))


def test_report_candidates_come_from_within_the_budget(a_study):
    within = front.complete_by_band(a_study, Budget(max_params=500_000))
    assert [[config.width for _, config in top_configurations(trials, n=5)] for _, trials in within] == [
        [64, 32], [512]]


def test_best_with_a_budget_from_the_command_line(tiny_study):
    workdir, spec, _ = tiny_study
    within = cli_in_process("best", "--spec", str(spec), "--max-params", "20000", "--json", cwd=workdir)
    assert within.returncode == 0, within.stderr
    assert json.loads(within.stdout)["n_parameters"] <= 20_000
    impossible = cli_in_process("best", "--spec", str(spec), "--max-params", "10", cwd=workdir)
    assert impossible.returncode == 2 and len(impossible.stderr.strip().splitlines()) == 1
    assert "has at most 10 parameters" in impossible.stderr and "Traceback" not in impossible.stderr


def test_a_latency_budget_in_onnx_runtime_reads_onnx_runtime_s_latency():
    timed = {"n_parameters": 1000, "latency_ms_batch1": 0.05, "latency_ms_batch1_onnxruntime": 0.01}
    assert not Budget(max_latency_ms=0.02).admits_costs(timed)  # PyTorch's 0.05 ms
    assert Budget(max_latency_ms=0.02, runtime="onnxruntime").admits_costs(timed)
    untimed = {"n_parameters": 1000, "latency_ms_batch1": 0.01}  # tuned without onnxruntime_latency
    assert not Budget(max_latency_ms=0.02, runtime="onnxruntime").admits_costs(untimed)


def test_an_onnx_runtime_budget_on_a_study_never_timed_there_says_how_to_time_it(a_study):
    with pytest.raises(SpecError, match="onnxruntime_latency = true"):
        Budget(max_latency_ms=1.0, runtime="onnxruntime").select(a_study.trials, "sized")

