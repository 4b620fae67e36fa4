"""A size budget: the most parameters, or the most milliseconds per image at batch 1, a student may cost.

`best --max-params N` and `report --max-latency-ms X` choose among the trials within it. Latency is the one
each trial recorded (kdtune.cost: eager PyTorch on the CPU the trial ran on); trials recorded before kdtune
measured latency have none and never meet a latency budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from kdtune.cost import LATENCY_SUFFIX
from kdtune.spec import SpecError


@dataclass(frozen=True)
class Budget:
    max_params: int | None = None
    max_latency_ms: float | None = None
    runtime: str = "pytorch"  # whose latency `max_latency_ms` limits: "pytorch" or "onnxruntime" (kdtune.cost)

    @property
    def latency_key(self) -> str:
        """The trial attribute (and report latency key) that holds the batch-1 latency in `runtime`."""
        return f"latency_ms_batch1{LATENCY_SUFFIX[self.runtime]}"

    def admits(self, trial: optuna.trial.FrozenTrial) -> bool:
        return self.admits_costs(trial.user_attrs)

    def admits_costs(self, costs: dict) -> bool:
        """Whether a student with these costs (a trial's user attributes, a report's band latency and
        parameters) fits; a cost never measured never fits."""
        return (self.max_params is None or costs.get("n_parameters", math.inf) <= self.max_params) and \
            (self.max_latency_ms is None or costs.get(self.latency_key, math.inf) <= self.max_latency_ms)

    def __str__(self) -> str:
        limits = []
        if self.max_params is not None:
            limits.append(f"at most {self.max_params:,} parameters")
        if self.max_latency_ms is not None:
            limits.append(f"at most {self.max_latency_ms:g} ms at batch 1"
                          + (" in ONNX Runtime" if self.runtime == "onnxruntime" else ""))
        return " and ".join(limits) or "no budget"

    def select(self, trials: list[optuna.trial.FrozenTrial], study_name: str) -> list[optuna.trial.FrozenTrial]:
        """The trials within the budget; none is a user error that says what the study does hold."""
        within = [t for t in trials if self.admits(t)]
        if trials and not within:
            smallest = min(trials, key=lambda t: t.user_attrs.get("n_parameters", math.inf))
            unmeasured = self.max_latency_ms is not None and all(self.latency_key not in t.user_attrs for t in trials)
            raise SpecError(f"no completed trial of study {study_name!r} has {self}: " + (
                "none was timed in ONNX Runtime; set onnxruntime_latency = true in the spec (and install "
                "kdtune[export]) before tuning." if unmeasured and self.runtime == "onnxruntime" else
                f"the smallest has {smallest.user_attrs.get('n_parameters', 0):,} parameters and "
                f"{smallest.user_attrs.get(self.latency_key, math.nan):.3g} ms at batch 1; raise the budget, or tune "
                "narrower students ([search] width)."))
        return within
