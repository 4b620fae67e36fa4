"""What training several trials' students at once buys: kdtune's batched trainer (`kdtune.batched`, as a study
runs a batch of narrow trials) against the same students one after another, per width and K, then the bound on
a study's gain.

K one-hidden-layer students of one width, each with its own temperature and lambda, train in one stacked model;
each one's validation curve is checked against the same student trained alone by kdtune's own `fit`. fp32
only: kdtune batches fp32 students only. Widths above the study's limit (`student.BATCH_MAX_WIDTH`) are
measured too, to show where the limit comes from.

The study-level bound is Amdahl's law over the time real studies spent in trials of the widths that batch.

    python bench/batched.py [--quick] [--threads N] [--study sqlite:///studies/<name>/study.db:<name> ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F

from kdtune import batched as kdtune_batched
from kdtune import data, hardware
from kdtune.losses import hinton_loss
from kdtune.models import StudentMLP
from kdtune.provenance import versions
from kdtune.spec import StudentSpec, load_spec
from kdtune.target import FINISHED
from kdtune.train import every_epoch, fit

sys.path.insert(0, str(Path(__file__).parent))
from flops import student_flops_per_epoch  # noqa: E402

WIDTHS = (16, 32, 64, 128, 256, 512)
KS = (4, 8, 16, 32)
QUICK_WIDTHS, QUICK_KS = (64,), (8,)


def train_batched(students: list[StudentMLP], configs: list[tuple[float, float]], splits, soft: torch.Tensor,
                  n_epochs: int, seed: int) -> tuple[float, list[list[float]]]:
    """(seconds, each student's validation accuracy after every epoch): kdtune's batched trainer, as a study runs
    a batch of trials."""
    members = [kdtune_batched.Student(student, every_epoch(functools.partial(hinton_loss, temperature=t,
                                                                             label_weight=w)))
               for student, (t, w) in zip(students, configs)]
    schedule = StudentSpec(max_epochs=n_epochs, patience_epochs=n_epochs)
    started = time.perf_counter()
    outcomes = kdtune_batched.fit_together(members, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                                           schedule=schedule, seed=seed, teacher_logits=soft)
    if splits.x_train.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, [outcome.result.val_curve for outcome in outcomes]


def train_one_at_a_time(students: list[StudentMLP], configs: list[tuple[float, float]], splits, soft: torch.Tensor,
                        n_epochs: int, seed: int) -> tuple[float, list[list[float]]]:
    """The same students trained one after another by kdtune's `fit`, as a study trains its trials today."""
    seconds, curves = 0.0, []
    for student, (temperature, label_weight) in zip(students, configs):
        result = fit(student, splits.x_train, splits.y_train, splits.x_val, splits.y_val, seed=seed,
                     loss_fn=every_epoch(functools.partial(hinton_loss, temperature=temperature,
                                                               label_weight=label_weight)),
                     schedule=StudentSpec(max_epochs=n_epochs, patience_epochs=n_epochs), teacher_logits=soft)
        seconds += result.seconds
        curves.append(result.val_curve)
    return seconds, curves


def students_and_configs(splits, k: int, width: int) -> tuple[list[StudentMLP], list[tuple[float, float]]]:
    """K students of one width and K (T, lambda) proposals. Each student starts from its own seed here (a study's
    trials of a width all start from the study's): the time does not depend on the weights."""
    students = []
    for i in range(k):
        torch.manual_seed(i)
        students.append(StudentMLP(splits.input_shape, splits.n_classes, width))
    return students, [(1.0 + 19.0 * i / k, (i % 5) / 4) for i in range(k)]


def measure(splits, soft: torch.Tensor, k: int, width: int, n_epochs: int) -> dict:
    """K students of one width, batched against one at a time, fresh copies of the same students on each side,
    each side after a one-epoch warm-up."""
    train_batched(*students_and_configs(splits, k, width), splits, soft, 1, 0)
    batched_s, batched_curves = train_batched(*students_and_configs(splits, k, width), splits, soft, n_epochs, 0)
    train_one_at_a_time(*students_and_configs(splits, 1, width), splits, soft, 1, 0)
    alone_s, alone_curves = train_one_at_a_time(*students_and_configs(splits, k, width), splits, soft, n_epochs, 0)
    differences = [abs(a - b) for one, other in zip(batched_curves, alone_curves) for a, b in zip(one, other)]
    model_flops, executed_flops = student_flops_per_epoch(len(splits.x_train), math.prod(splits.input_shape), width,
                                                          splits.n_classes)
    student_epochs = k * n_epochs
    return {"width": width, "students": k, "epochs": n_epochs,
            "student_epochs_per_s_alone": student_epochs / alone_s,
            "student_epochs_per_s_batched": student_epochs / batched_s, "speedup": alone_s / batched_s,
            "model_gflops_alone": model_flops * student_epochs / alone_s / 1e9,
            "model_gflops_batched": model_flops * student_epochs / batched_s / 1e9,
            "executed_gflops_alone": executed_flops * student_epochs / alone_s / 1e9,
            "executed_gflops_batched": executed_flops * student_epochs / batched_s / 1e9,
            "max_val_difference": max(differences),
            "val_epochs_that_differ": sum(d > 0 for d in differences), "val_epochs": len(differences)}


def study_bound(trial_times: list[tuple[int, float]], speedups: dict[int, float]) -> dict:
    """Amdahl's law: the study's speed-up if every trial of a width in `speedups` ran that much faster (the
    nearest measured width at or above it), all others as they did."""
    total = sum(seconds for _, seconds in trial_times)
    limit = max(speedups)
    saved = sum(seconds - seconds / speedups[min(w for w in speedups if w >= width)]
                for width, seconds in trial_times if width <= limit)
    share = sum(seconds for width, seconds in trial_times if width <= limit) / total
    return {"widths_up_to": limit, "time_share": share, "study_speedup": total / (total - saved),
            "study_speedup_if_free": math.inf if share >= 1 else 1 / (1 - share)}


def trial_times_of(storage: str, name: str) -> list[tuple[int, float]]:
    """(width, seconds) of every finished trial of a stored study of one-hidden-layer MLPs, the students
    measured here."""
    stored = optuna.load_study(study_name=name, storage=storage)
    students = stored.user_attrs.get("spec", {}).get("student", {})
    if (students.get("family", "mlp"), students.get("depth", 1)) != ("mlp", 1):
        raise SystemExit(f"study {name!r} trains {students.get('family')} students of depth {students.get('depth')}: "
                         "the speed-ups measured here are for one-hidden-layer MLPs.")
    return [(t.params["width"], t.user_attrs["seconds"]) for t in stored.get_trials(states=FINISHED)]


def with_pooled_speedups(rows: list[dict]) -> list[dict]:
    """Each row's speed-up against the median one-at-a-time rate of its width over every K: the one-at-a-time
    rate does not depend on K, so its spread over K is the machine's noise."""
    for row in rows:
        alone = statistics.median(r["student_epochs_per_s_alone"] for r in rows if r["width"] == row["width"])
        row["speedup_vs_median_alone"] = row["student_epochs_per_s_batched"] / alone
    return rows


def section(splits, soft: torch.Tensor, n_epochs: int, *, widths: tuple[int, ...] = WIDTHS,
            ks: tuple[int, ...] = KS, studies: dict[str, list[tuple[int, float]]] | None = None) -> dict:
    """Every (width, K) measured; each study's Amdahl bound at the best K of every width up to 128 (the narrow
    students) and up to 512, against the pooled one-at-a-time rate."""
    rows = with_pooled_speedups([measure(splits, soft, k, width, n_epochs) for width in widths for k in ks])
    best = {width: max(r["speedup_vs_median_alone"] for r in rows if r["width"] == width) for width in widths}
    limits = sorted({max(w for w in best if w <= limit) for limit in (128, 512) if any(w <= limit for w in best)})
    bounds = {name: [study_bound(times, {w: s for w, s in best.items() if w <= limit}) for limit in limits]
              for name, times in (studies or {}).items() if times}
    return {"rows": rows, "best_speedup_by_width": best, "study_bounds": bounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one width, one K, two epochs: a smoke run")
    parser.add_argument("--epochs", dest="n_epochs", type=int, default=5)
    parser.add_argument("--study", action="append", default=[],
                        help="STORAGE:NAME of a finished study whose trial times bound the study-level gain")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per usable CPU)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/batched-<date>.json)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hardware.configure_threads(args.threads)
    spec = load_spec()
    splits = data.prepare(spec.data, spec.seed)
    # Speed does not depend on the teacher's values: students learn from a stand-in that is always right.
    soft = 4.0 * F.one_hot(splits.y_train, splits.n_classes).float()
    if any(not re.fullmatch(r".+://.+:[^:/]+", study) for study in args.study):
        parser.error("--study takes STORAGE:NAME, e.g. sqlite:///studies/quickstart/study.db:quickstart")
    studies = {name: trial_times_of(storage, name) for storage, name in (s.rsplit(":", 1) for s in args.study)}
    machine = {"cpu": hardware.cpu_model(), "cpu_flags": hardware.reported_cpu_flags(),
               "torch_threads": torch.get_num_threads(), "native_bf16": hardware.has_native_bf16(torch.device("cpu"))}
    print(machine)
    started = time.perf_counter()
    found = section(splits, soft, 2 if args.quick else args.n_epochs, widths=QUICK_WIDTHS if args.quick else WIDTHS,
                    ks=QUICK_KS if args.quick else KS, studies=studies)
    for row in found["rows"]:
        print(row)
    print(json.dumps(found["study_bounds"], indent=1))
    results = {"machine": machine, "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join(sys.argv), **found, "seconds": time.perf_counter() - started}
    out = args.out or Path("bench/results") / f"batched-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{results['seconds']:.0f} s; written {out}")


if __name__ == "__main__":
    main()
