"""The size front of a study: the best student of each size band by validation accuracy, as `best` prints it
and the dashboard shows it. (The report's front retrains each band's best over fresh seeds and reads the test
set; this one is the search's own view, on one seed.)"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdtune import bands
from kdtune.bands import Band
from kdtune.budget import Budget
from kdtune.student import StudentConfig


def study_bands(study: optuna.Study) -> list[Band]:
    """The bands the study recorded; a study made before bands is one band over the widths its trials used."""
    recorded = bands.recorded(study)
    if recorded is not None:
        return recorded
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return []
    narrowest = min(trials, key=lambda t: t.params["width"])
    widest = max(trials, key=lambda t: t.params["width"])
    return [Band(0, narrowest.params["width"], widest.params["width"],
                 narrowest.user_attrs.get("n_parameters", 0), widest.user_attrs.get("n_parameters", 0))]


def complete_by_band(study: optuna.Study, budget: Budget = Budget()) -> list[tuple[Band, list[FrozenTrial]]]:
    """(band, its completed trials within `budget`) for each band that has any, narrowest first."""
    return [(band, [t for t in trials if t.state == TrialState.COMPLETE])
            for band, trials in finished_by_band(study, budget)
            if any(t.state == TrialState.COMPLETE for t in trials)]


def finished_by_band(study: optuna.Study, budget: Budget = Budget()) -> list[tuple[Band, list[FrozenTrial]]]:
    """(band, its finished trials, complete or pruned, within `budget`) for every band."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if budget.admits(t)]
    return [(band, [t for t in finished if bands.of_trial(t) == band.index]) for band in study_bands(study)]


def best_of(trials: list[FrozenTrial]) -> FrozenTrial:
    """The best validation accuracy; of equals, the smaller student."""
    return max(trials, key=lambda t: (t.value, -t.user_attrs.get("n_parameters", 0)))


def best_per_band(study: optuna.Study, budget: Budget = Budget()) -> list[dict]:
    """One entry per band with a completed trial within `budget`: the band, its trial counts and its best."""
    entries = []
    for band, trials in finished_by_band(study, budget):
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:  # every trial of the band pruned, or none run yet
            continue
        trial = best_of(complete)
        config = StudentConfig.from_trial(trial)
        entries.append({
            "band": band.index, "band_label": band.label, "min_params": band.min_params,
            "max_params": band.max_params, "n_finished": len(trials), "n_complete": len(complete),
            "trial": trial.number, "width": config.width, "n_parameters": trial.user_attrs.get("n_parameters"),
            "latency_ms": trial.user_attrs.get("latency_ms_batch1"),
            "latency_ms_onnxruntime": trial.user_attrs.get("latency_ms_batch1_onnxruntime"),
            "val_accuracy": trial.value,
            "temperature": config.temperature, "lambda": config.label_weight, "loss": config.loss_label})
    return entries


def to_markdown(entries: list[dict]) -> str:
    """The front as a table: the dashboard's study note, `best`'s text output."""
    onnx = any(e.get("latency_ms_onnxruntime") is not None for e in entries)  # onnxruntime_latency = true
    latency = "latency (ms, batch 1: PyTorch / ONNX Runtime)" if onnx else "latency (ms, batch 1)"
    lines = [f"| band | trials finished (complete) | best trial | loss | width | parameters | {latency} | T "
             "| lambda | val accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        timed = _or_dash(e["latency_ms"]) + (f" / {_or_dash(e.get('latency_ms_onnxruntime'))}" if onnx else "")
        lines.append(f"| {e['band_label']} | {e['n_finished']} ({e['n_complete']}) | {e['trial']} | "
                     f"{e.get('loss', 'hinton')} | {e['width']} | "
                     f"{e['n_parameters']:,} | {timed} | {e['temperature']:.3g} | "
                     f"{e['lambda']:.3g} | {100 * e['val_accuracy']:.2f}% |")
    return "\n".join(lines)


def _or_dash(latency_ms: float | None) -> str:
    return "-" if latency_ms is None else f"{latency_ms:.3g}"  # trials from before latency was measured
