"""Which pruner should a kdtune study use by default? Measure it, side by side, in one process.

    python bench/pruners.py [--spec studies/quickstart.toml] [--trials 100] [--pruners median,hyperband,none]

Runs the same study (same spec, same cached teacher, same sampler seed, the control arms first as `tune`
runs them) once per pruner, in memory, and prints wall time, student epochs trained, trials pruned and the
best validation accuracy of each; writes the table as JSON to bench/results/pruners-<machine>-<date>.json.
Besides the spec's pruners, `percentile-P` is a candidate measured here only: Optuna's PercentilePruner
keeping the top P% of trials at each epoch (the median pruner keeps the top 50%).
"""

import argparse
import dataclasses
import json
import platform
import time
import warnings
from pathlib import Path

import optuna
import torch

from kdtune import data, study, teacher
from kdtune.provenance import versions
from kdtune.spec import load_spec


def make_candidate(spec, name: str) -> optuna.pruners.BasePruner:
    if name.startswith("percentile-"):
        return optuna.pruners.PercentilePruner(float(name.removeprefix("percentile-")),
                                               n_startup_trials=spec.search.n_startup_trials,
                                               n_warmup_steps=spec.search.n_warmup_epochs)
    return study.make_pruner(dataclasses.replace(spec, search=dataclasses.replace(spec.search, pruner=name)))


def run_one(spec, pruner: str, splits, cached, n_trials: int) -> dict:
    the_study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.seed),
                                    pruner=make_candidate(spec, pruner), study_name=spec.name)
    study.enqueue_control_arms(the_study, spec.search)
    started = time.perf_counter()
    the_study.optimize(study.make_objective(spec, splits, cached), n_trials=n_trials)
    seconds = time.perf_counter() - started
    trials = the_study.trials
    return {"pruner": pruner, "n_trials": len(trials), "seconds": round(seconds, 1),
            "student_epochs": sum(t.user_attrs["n_epochs"] for t in trials),
            "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "best_val_accuracy": the_study.best_value, "best_params": the_study.best_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("studies/quickstart.toml"))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--pruners", default="median,hyperband,none")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    spec = load_spec(args.spec)
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits)
    rows = []
    for pruner in args.pruners.split(","):
        rows.append(run_one(spec, pruner, splits, cached, args.trials))
        print(json.dumps(rows[-1]), flush=True)

    baseline = next((r for r in rows if r["pruner"] == "none"), rows[0])
    print(f"\n{'pruner':<10} {'seconds':>8} {'epochs':>7} {'pruned':>7} {'best val':>9} "
          f"{'epochs vs none':>15} {'time vs none':>13}")
    for r in rows:
        print(f"{r['pruner']:<10} {r['seconds']:>8.1f} {r['student_epochs']:>7} {r['n_pruned']:>7} "
              f"{r['best_val_accuracy']:>9.4f} {baseline['student_epochs'] / r['student_epochs']:>14.2f}x "
              f"{baseline['seconds'] / r['seconds']:>12.2f}x")
    out = Path("bench/results") / f"pruners-{platform.node() or 'machine'}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": str(args.spec), "trials": args.trials, "rows": rows,
                               "torch_threads": torch.get_num_threads(), "cpu": platform.processor(),
                               "versions": versions()}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
