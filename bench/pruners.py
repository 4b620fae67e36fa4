"""Which pruner should a kdtune study use by default? Measure it, side by side, over several seeds.

    python bench/pruners.py [--spec studies/quickstart.toml] [--trials 100] [--pruners median,successive-halving,none]
                            [--seeds 3] [--jobs 2]

Runs the same study (same spec, same cached teacher, the control arms first as `tune` runs them) once per
pruner and seed, in memory, and prints wall time, student epochs trained, trials pruned and the best
validation accuracy of each, then their means over seeds; writes it all as JSON to
bench/results/pruners-<machine>-<date>.json. A seed sets both the sampler and the students' initialisation
(the validation split stays the spec's), so "the same best accuracy" is judged over seeds, not on one lucky
one. `--jobs N` runs N studies at once, each in its own process with its share of the CPUs; the epoch counts
and accuracies do not depend on it, the seconds do (compare seconds within one run with the same --jobs).
Besides the spec's pruners, two candidates are measured here only: `percentile-P`, Optuna's PercentilePruner
keeping the top P% of trials at each epoch (the median pruner keeps the top 50%), and `median-startup-N`, the
median pruner judging a size band's trials once N of them have finished (the spec's n_startup_trials). Every
pruner judges a trial among its own size band's trials, and each band's best is compared with the unpruned
study's best in that band.
"""

import argparse
import dataclasses
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import joblib
import optuna

from kdtune import bands, data, front, hardware, study, target, teacher
from kdtune.per_band import PerBandPruner
from kdtune.provenance import versions
from kdtune.spec import load_spec
from kdtune.student import Architecture


def make_candidate(spec, name: str) -> optuna.pruners.BasePruner:
    if name.startswith("median-startup-"):  # the median pruner judging a band after this many of its trials
        return PerBandPruner(optuna.pruners.MedianPruner(n_startup_trials=int(name.removeprefix("median-startup-")),
                                                         n_warmup_steps=spec.search.n_warmup_epochs))
    if name.startswith("percentile-"):
        return PerBandPruner(optuna.pruners.PercentilePruner(float(name.removeprefix("percentile-")),
                                                             n_startup_trials=spec.search.n_startup_trials,
                                                             n_warmup_steps=spec.search.n_warmup_epochs))
    return study.make_pruner(dataclasses.replace(spec, search=dataclasses.replace(spec.search, pruner=name)))


def run_one(spec, pruner: str, seed: int, splits, cached, compute: hardware.Compute, n_trials: int,
            n_threads: int) -> dict:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # again: a joblib worker is a fresh process
    hardware.configure_threads(n_threads)
    spec = dataclasses.replace(spec, seed=seed)
    the_study = optuna.create_study(direction="maximize", sampler=study.make_sampler(seed), study_name=spec.name,
                                    pruner=make_candidate(spec, pruner))
    architecture = Architecture.of(spec.student, splits.input_shape, splits.n_classes)
    size_bands = bands.size_bands(spec.search, architecture, cached.n_parameters)
    bands.record(the_study, size_bands)  # as `tune` records them
    study.enqueue_control_arms(the_study, spec.search, spec.student.loss, size_bands)
    started = time.perf_counter()
    the_study.optimize(study.make_objective(spec, splits, cached, compute), n_trials=n_trials)
    seconds = time.perf_counter() - started
    trials = the_study.get_trials(states=target.FINISHED)  # not the control arms still queued in a short run
    return {"pruner": pruner, "seed": seed, "n_trials": len(trials), "seconds": round(seconds, 1),
            "student_epochs": sum(t.user_attrs["n_epochs"] for t in trials),
            "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "best_val_accuracy": the_study.best_value, "best_params": the_study.best_params,
            "best_per_band": {e["band_label"]: e["val_accuracy"] for e in front.best_per_band(the_study)}}


def summarize(rows: list[dict], baseline: str) -> list[dict]:
    """Per pruner, means over seeds, and the best accuracy's change against the baseline on the same seed."""
    base = {r["seed"]: r for r in rows if r["pruner"] == baseline}
    base_epochs = statistics.fmean(r["student_epochs"] for r in base.values())
    base_seconds = statistics.fmean(r["seconds"] for r in base.values())
    summary = []
    for pruner in dict.fromkeys(r["pruner"] for r in rows):
        mine = [r for r in rows if r["pruner"] == pruner]
        best = [r["best_val_accuracy"] for r in mine]
        change = [100 * (r["best_val_accuracy"] - base[r["seed"]]["best_val_accuracy"]) for r in mine]
        summary.append({
            "pruner": pruner, "seeds": len(mine),
            "seconds": statistics.fmean(r["seconds"] for r in mine),
            "student_epochs": statistics.fmean(r["student_epochs"] for r in mine),
            "n_pruned": statistics.fmean(r["n_pruned"] for r in mine),
            "best_val_accuracy": statistics.fmean(best),
            "best_val_sd": statistics.stdev(best) if len(best) > 1 else 0.0,
            "epochs_vs_baseline": base_epochs / statistics.fmean(r["student_epochs"] for r in mine),
            "time_vs_baseline": base_seconds / statistics.fmean(r["seconds"] for r in mine),
            "best_change_points": statistics.fmean(change),
            "best_change_min_points": min(change), "best_change_max_points": max(change),
            # each band's best against the unpruned study's best in that band, same seed: mean over seeds
            "band_change_points": {label: statistics.fmean(
                100 * (r["best_per_band"][label] - base[r["seed"]]["best_per_band"][label]) for r in mine)
                for label in mine[0]["best_per_band"] if all(label in r["best_per_band"] for r in mine)}})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("studies/quickstart.toml"))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--pruners", default="median,successive-halving,none")
    parser.add_argument("--seeds", type=int, default=1, help="studies per pruner, seeds from the spec's upwards")
    parser.add_argument("--jobs", type=int, default=1, help="studies run at once, each in its own process")
    args = parser.parse_args()
    pruners = args.pruners.split(",")
    if "none" not in pruners:
        parser.error("--pruners must include none: every figure is measured against no pruning")
    if "hyperband" in pruners:
        parser.error("hyperband cannot judge each size band apart (see kdtune/spec.py); leave it out")

    spec = load_spec(args.spec)
    splits = data.prepare(spec.data, spec.seed)
    compute = hardware.resolve_compute(spec.device, spec.precision)
    cached = teacher.load_or_train(spec, splits, compute)
    n_threads = max(1, hardware.available_cpus() // args.jobs)
    runs = [(pruner, spec.seed + i) for i in range(args.seeds) for pruner in pruners]
    rows = []
    for row in joblib.Parallel(n_jobs=args.jobs, return_as="generator")(
            joblib.delayed(run_one)(spec, pruner, seed, splits, cached, compute, args.trials, n_threads)
            for pruner, seed in runs):
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = summarize(rows, baseline="none")
    print(f"\nmeans over {args.seeds} seed(s), {args.trials} trials each, {args.jobs} at once, "
          f"{n_threads} torch thread(s) each")
    print(f"{'pruner':<16} {'seconds':>8} {'epochs':>8} {'pruned':>7} {'best val':>16} {'best vs none':>22} "
          f"{'epochs vs none':>15} {'time vs none':>13}")
    for s in summary:
        print(f"{s['pruner']:<16} {s['seconds']:>8.1f} {s['student_epochs']:>8.1f} {s['n_pruned']:>7.1f} "
              f"{s['best_val_accuracy']:>9.4f} ± {s['best_val_sd']:.4f} "
              f"{s['best_change_points']:>+7.2f} "
              f"({s['best_change_min_points']:+.2f}..{s['best_change_max_points']:+.2f})"
              f" {s['epochs_vs_baseline']:>14.2f}x {s['time_vs_baseline']:>12.2f}x")
        print("    each band's best vs none (points, mean over seeds): " + ", ".join(
            f"{label} {change:+.2f}" for label, change in s["band_change_points"].items()))
    out = Path("bench/results") / f"pruners-{platform.node() or 'machine'}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": str(args.spec), "trials": args.trials, "seeds": args.seeds,
                               "jobs": args.jobs, "torch_threads": n_threads, "cpu": platform.processor(),
                               "cpu_flags": hardware.reported_cpu_flags(), "versions": versions(),
                               "rows": rows, "summary": summary}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
