"""What a study's storage costs per trial: the storage calls kdtune's objective makes, with no training.

Shared by bench/run.py (overhead section) and bench/workers.py.
"""

from __future__ import annotations

import time

import optuna

from kdtune import study
from kdtune.bands import Band
from kdtune.spec import Spec

# What kdtune's objective records per trial besides the three params and the per-epoch reports.
TRIAL_ATTRIBUTES = ("loss", "n_parameters", "n_epochs", "seconds", "teacher_agreement", "kl_at_temperature",
                    "calibration_error")


def ms_per_trial(storage, spec: Spec, n_trials: int = 30, n_epochs: int = 10) -> float:
    """Milliseconds of storage work per trial of `n_epochs` reports, on `storage` (a URL, an Optuna storage,
    or None for in-memory), with kdtune's pruner asking after every report."""
    # one band over the whole width range: the storage calls are the same in any band
    band = Band(0, int(spec.search.width.low), int(spec.search.width.high), 0, 0)

    def bookkeeping(trial: optuna.Trial) -> float:
        study.suggest(trial, spec.search, "hinton", band)
        for name in TRIAL_ATTRIBUTES:
            trial.set_user_attr(name, 1.0)
        for epoch in range(n_epochs):
            trial.report(0.5, epoch)
            trial.should_prune()
        return 0.5

    bench_study = optuna.create_study(storage=storage, direction="maximize", pruner=study.make_pruner(spec))
    started = time.perf_counter()
    bench_study.optimize(bookkeeping, n_trials=n_trials)
    return 1000 * (time.perf_counter() - started) / n_trials
