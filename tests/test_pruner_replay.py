"""The slow-starter check: a band winner's search curve replayed through the study's own pruner."""

import optuna
from optuna.distributions import IntDistribution

from kdtune import bands, pruner_replay
from kdtune.spec import load_spec


def finished(number_of_band: int, curve: list[float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"width": 16}, distributions={"width": IntDistribution(16, 2048)}, value=max(curve),
        intermediate_values=dict(enumerate(curve)), user_attrs={bands.TRIAL_KEY: number_of_band})


def test_a_slow_starter_is_stopped_where_its_curve_falls_below_its_bands_median_and_not_by_other_bands():
    spec = load_spec()  # the median pruner, 5 startup trials, 2 warm-up epochs
    assert (spec.search.pruner, spec.search.n_startup_trials, spec.search.n_warmup_epochs) == ("median", 5, 2)
    band = [finished(1, [0.5, 0.6, 0.7, 0.8]) for _ in range(5)]
    other_band = [finished(0, [0.99, 0.99, 0.99, 0.99]) for _ in range(9)]  # would move the median if counted
    trials = band + other_band
    for number, trial in enumerate(trials):
        trial.number = number
    late = finished(1, [0.1, 0.2, 0.9, 0.95])  # below the median only in the epochs the warm-up spares
    very_late = finished(1, [0.1, 0.2, 0.3, 0.95])
    late.number, very_late.number = 100, 101
    assert pruner_replay.pruned_at_epoch(spec, late, band + [late]) is None
    assert pruner_replay.pruned_at_epoch(spec, very_late, band + [very_late]) == 3
    assert pruner_replay.pruned_at_epoch(spec, late, trials + [late]) is None, "judged in its own band only"


def test_the_summary_counts_the_winners_the_replay_would_stop():
    said = pruner_replay.summary([{"band_label": "a", "winner_trial": 3, "pruned_at_epoch": 4},
                                  {"band_label": "b", "winner_trial": 9, "pruned_at_epoch": None}], "median")
    assert "1 of 2 band winners would have been stopped (a: trial 3 after epoch 4)" in said
