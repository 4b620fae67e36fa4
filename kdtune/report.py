"""The final, honest comparison: the only place kdtune reads the test set.

The best configuration, its no-distillation twin (same width, lambda = 1) and the seed project's
configuration are each retrained with K fresh seeds (not the seed the search used, so a configuration
that won by a lucky seed does not keep its luck). The distillation gain is paired over seeds: same seed,
same initial weights and batch order, with and without the teacher.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import optuna
from scipy import stats

from kdtune.data import Splits
from kdtune.models import n_parameters, resolve_device
from kdtune.provenance import machine, versions
from kdtune.spec import Spec, to_toml_dict
from kdtune.study import StudentConfig, TrialData, best, train_student
from kdtune.teacher import CachedTeacher
from kdtune.train import accuracy, accuracy_of_logits

REFERENCE = StudentConfig(temperature=10.0, label_weight=0.5, width=512, loss="reference")


def arms(best_config: StudentConfig) -> dict[str, StudentConfig]:
    return {
        "tuned": best_config,
        "no_distillation": StudentConfig(best_config.temperature, 1.0, best_config.width, "hinton"),
        "reference": REFERENCE,
    }


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t confidence interval."""
    mean = statistics.fmean(differences)
    half = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * statistics.stdev(differences) \
        / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def evaluate(spec: Spec, splits: Splits, teacher: CachedTeacher, study: optuna.Study, echo=print) -> dict:
    device = resolve_device(spec.device)
    data = TrialData.on_device(splits, device)
    x_test, y_test = splits.x_test.to(device), splits.y_test.to(device)
    teacher_train_logits = teacher.logits["train"].to(device)
    best_trial = best(study)
    seeds = [spec.seed + 1 + i for i in range(spec.report.n_seeds)]
    rows = {}
    started = time.perf_counter()
    for name, config in arms(StudentConfig.from_params(best_trial, spec.student.loss)).items():
        runs = []
        for seed in seeds:
            model, result = train_student(config, spec.student, data, teacher_train_logits, seed)
            runs.append({"seed": seed, "val_accuracy": result.val_accuracy, "n_epochs": result.n_epochs,
                         "test_accuracy": accuracy(model, x_test, y_test)})
            echo(f"  {name:<16} seed {seed}: test accuracy {runs[-1]['test_accuracy']:.4f}")
        tests = [r["test_accuracy"] for r in runs]
        rows[name] = {"config": {"temperature": config.temperature, "lambda": config.label_weight,
                                 "width": config.width, "loss": config.loss},
                      "n_parameters": n_parameters(model), "runs": runs,
                      "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests)}
    differences = [a["test_accuracy"] - b["test_accuracy"]
                   for a, b in zip(rows["tuned"]["runs"], rows["no_distillation"]["runs"])]
    gain, low, high = paired_interval(differences) if len(set(differences)) > 1 else (differences[0],) * 3
    return {
        "study": study.study_name, "best_trial": best_trial, "seeds": seeds,
        "teacher": {"cache_id": teacher.cache_id, "n_parameters": teacher.meta["n_parameters"],
                    "val_accuracy": teacher.val_accuracy,
                    "test_accuracy": accuracy_of_logits(teacher.logits["test"], splits.y_test)},
        "rows": rows, "gain": {"mean": gain, "ci95_low": low, "ci95_high": high, "paired_differences": differences},
        "verdict": verdict(gain, low, high), "seconds": round(time.perf_counter() - started, 1),
        "spec": to_toml_dict(spec), "data_fingerprint": splits.fingerprint, "versions": versions(),
        "machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def verdict(gain: float, low: float, high: float) -> str:
    points = f"{100 * gain:+.2f} points (95% CI {100 * low:+.2f} to {100 * high:+.2f})"
    if low > 0:
        return f"Distillation pays: the tuned student beats the same student trained alone by {points}."
    if high < 0:
        return f"Distillation hurts here: {points} against the same student trained alone."
    return f"No gain distinguishable from seed noise: {points}. Train the student alone, or try a stronger teacher."


def to_markdown(report: dict) -> str:
    teacher = report["teacher"]
    lines = [
        f"# Distillation report: {report['study']}", "",
        f"Test accuracy over {len(report['seeds'])} seeds {report['seeds']} (mean ± std). The configuration was "
        f"chosen on validation accuracy (trial {report['best_trial']['trial']}, "
        f"val {report['best_trial']['val_accuracy']:.4f}); the test set was read only here.", "",
        "| model | temperature | lambda | width | loss | parameters | test accuracy |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (CNN) | | | | | {teacher['n_parameters']:,} | {100 * teacher['test_accuracy']:.2f}% |",
    ]
    for name, row in report["rows"].items():
        c = row["config"]
        lines.append(f"| {name.replace('_', ' ')} | {c['temperature']:.3g} | {c['lambda']:.3g} | {c['width']} | "
                     f"{c['loss']} | {row['n_parameters']:,} | {100 * row['test_mean']:.2f} ± "
                     f"{100 * row['test_std']:.2f}% |")
    lines += ["", f"**Verdict.** {report['verdict']}", "",
              f"Data fingerprint `{report['data_fingerprint'][:16]}`, teacher cache `{teacher['cache_id']}`, "
              f"{report['machine']}, torch {report['versions']['torch']}, optuna {report['versions']['optuna']}."]
    return "\n".join(lines) + "\n"


def write(report: dict, spec: Spec) -> tuple[str, str]:
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = spec.output_dir / "report.json", spec.output_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(to_markdown(report))
    return str(md_path), str(json_path)
