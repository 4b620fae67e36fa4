"""Optuna's sampler and pruner, each judging a trial among the trials of its own size band only.

In one study over all sizes, TPE's "good" trials would all be wide students and a median pruner would compare
a narrow student's epoch with wide students' epochs: narrow students would get wide students' temperatures,
and be pruned for being narrow. Here a trial's band (`kdtune.bands`, a trial user attribute set before its
first suggestion) decides which trials the wrapped sampler and pruner see: a study per band, in effect, inside
one Optuna study, so that workers, resume, control arms, heartbeats and the exact trial count work unchanged.

Every sampler call sees the trial's band: Optuna asks for relative (joint) parameters lazily, at a trial's
first suggestion, and kdtune's objective sets the band before that.
"""

from __future__ import annotations

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from kdtune import bands
from kdtune.optuna_compat import TrialSubset


def band_view(study: optuna.Study, trial: FrozenTrial) -> TrialSubset:
    band = bands.of_trial(trial)
    return TrialSubset(study, lambda t: bands.of_trial(t) == band)


class PerBandSampler(optuna.samplers.BaseSampler):
    def __init__(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler = sampler

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(band_view(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self.sampler.sample_relative(band_view(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution):
        return self.sampler.sample_independent(band_view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class PerBandPruner(optuna.pruners.BasePruner):
    def __init__(self, pruner: optuna.pruners.BasePruner) -> None:
        self.pruner = pruner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.pruner.prune(band_view(study, trial), trial)
