"""What judging each trial among its own size band costs the sampler: TPE over all trials against TPE through
kdtune's per-band filter, side by side on the same synthetic study.

    python bench/sampling.py [--trials 100] [--bands 5]

Each study first holds `--trials` finished trials spread over the bands (three parameters, as kdtune samples
them); then 50 more are sampled and timed, in memory, so the figure is the sampler's own cost per trial.
"""

from __future__ import annotations

import argparse
import random
import time

import optuna

from kdtune import bands
from kdtune.per_band import PerBandSampler


def one_trial(the_study: optuna.Study, number: int, n_bands: int) -> None:
    """A trial as kdtune's objective makes one: its band first, then its width within the band's widths (the
    log range 16-2,048 cut into equal parts)."""
    trial = the_study.ask()
    band = number % n_bands
    trial.set_user_attr(bands.TRIAL_KEY, band)
    trial.suggest_float("temperature", 1.0, 20.0, log=True)
    trial.suggest_float("lambda", 0.0, 1.0)
    low, high = (round(16 * 128 ** (edge / n_bands)) for edge in (band, band + 1))
    trial.suggest_int("width", low + (band > 0), high, log=True)
    the_study.tell(trial, random.random())


def ms_per_trial(sampler: optuna.samplers.BaseSampler, n_trials: int, n_bands: int, n_timed: int = 50) -> float:
    random.seed(0)
    the_study = optuna.create_study(direction="maximize", sampler=sampler)
    for number in range(n_trials):
        one_trial(the_study, number, n_bands)
    started = time.perf_counter()
    for number in range(n_trials, n_trials + n_timed):
        one_trial(the_study, number, n_bands)
    return 1000 * (time.perf_counter() - started) / n_timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--bands", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = ms_per_trial(optuna.samplers.TPESampler(seed=0), args.trials, args.bands)
    per_band = ms_per_trial(PerBandSampler(optuna.samplers.TPESampler(seed=0)), args.trials, args.bands)
    print(f"ms per sampled trial after {args.trials} trials in {args.bands} bands: TPE over all trials {plain:.1f}, "
          f"TPE per band {per_band:.1f} (ratio {per_band / plain:.2f})")


if __name__ == "__main__":
    main()
