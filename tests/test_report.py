"""The report's statistics and verdict (the end-to-end report runs in test_cli.py)."""

import pytest

from kdtune.report import arms, paired_interval, pick_winner, verdict
from kdtune.study import StudentConfig


def test_identical_arms_give_a_zero_width_interval():
    assert paired_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)


def test_paired_interval_is_the_student_t_interval():
    mean, low, high = paired_interval([0.01, 0.02, 0.03])
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
    compared = arms(tuned)
    twin = compared["no_distillation"]
    assert (twin.width, twin.label_weight, twin.loss) == (100, 1.0, "hinton")
    assert compared["reference"] == StudentConfig(10.0, 0.5, 512, "reference")


def test_winner_is_the_best_mean_over_seeds_and_ties_go_to_the_smaller_student():
    candidates = [{"trial": 0, "val_mean": 0.80, "n_parameters": 10},
                  {"trial": 1, "val_mean": 0.85, "n_parameters": 900},
                  {"trial": 2, "val_mean": 0.85, "n_parameters": 300}]
    assert pick_winner(candidates)["trial"] == 2


def test_verdict_when_the_winner_does_not_distil():
    assert verdict(0.0, 0.0, 0.0, teacher_lead=0.03, winner_distils=False).startswith(
        "No gain here: the best configuration on validation does not distil")
