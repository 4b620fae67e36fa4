"""The student budget curve: what distillation gains at each training budget, for two widths, on validation.

Issue 28: a verdict of "no gain" at a small size may only say that the budget (30 epochs, patience 5) cut a
slow, distilled learner short while its twin (lambda = 1) had converged. For each budget policy and width this
trains the distilled configuration and its twin over the same seeds (paired: same initial weights and batches)
and prints each one's best-epoch validation accuracy, the epoch it stopped at and the paired gain. The test
set is not read: defaults are chosen on validation.

    python bench/budget.py --spec studies/fashion-mnist.toml --out bench/results/budget-<machine>.jsonl

Each run is appended to --out as it ends; run it again with the same --out to resume after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from kdtune import data, hardware, student, teacher
from kdtune.provenance import machine, versions
from kdtune.spec import load_spec
from kdtune.student import Architecture, StudentConfig
from kdtune.transfer import StudentData

# (max_epochs, patience_epochs, lr_schedule): today's budget, the same twice as long, and cosine decays run through
POLICIES = [(30, 5, "constant"), (60, 10, "constant"), (30, 30, "cosine"), (60, 60, "cosine")]
# The two narrow band winners of the full Fashion-MNIST front of 2026-11-28 (docs/results/fashion-mnist.md):
# 29,425 and 98,590 parameters.
CONFIGS = [StudentConfig(1.31, 0.579, 37), StudentConfig(1.12, 0.209, 124)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("studies/fashion-mnist.toml"))
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per run; resumed if it exists")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    hardware.configure_threads(args.threads)
    spec = load_spec(args.spec)
    compute = hardware.resolve_compute(spec.device, spec.precision)
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, compute)
    student_data = StudentData.build(splits, cached.logits["train"], spec.transfer, spec.seed, compute.device)
    architecture = Architecture.of(spec.student, student_data.input_shape, student_data.n_classes)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    header = {"machine": machine(), "cpu_flags": hardware.reported_cpu_flags(), "versions": versions(),
              "data_fingerprint": splits.fingerprint, "teacher": cached.cache_id}
    if not done:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header}) + "\n")
    elif done[0]["header"]["machine"] != header["machine"]:
        sys.exit(f"bench: {args.out} was begun on {done[0]['header']['machine']}; pass another --out.")
    print(header)
    keys = {(r["policy"], r["width"], r["arm"], r["seed"]) for r in done[1:]}
    for config in CONFIGS:
        for max_epochs, patience, lr_schedule in POLICIES:
            schedule = dataclasses.replace(spec.student, max_epochs=max_epochs, patience_epochs=patience,
                                           lr_schedule=lr_schedule)
            policy = f"{max_epochs}/{patience} {lr_schedule}"
            for seed in range(1, args.seeds + 1):
                for arm, arm_config in (("tuned", config), ("twin", dataclasses.replace(config, label_weight=1.0))):
                    if (policy, config.width, arm, seed) in keys:
                        continue
                    _, result = student.train(arm_config, architecture, schedule, student_data, seed, compute)
                    row = {"policy": policy, "width": config.width, "arm": arm, "seed": seed,
                           "config": arm_config.as_params(), "val_accuracy": result.val_accuracy,
                           "n_epochs": result.n_epochs, "best_epoch": result.val_curve.index(result.val_accuracy) + 1,
                           "seconds": round(result.seconds, 1), "val_curve": result.val_curve}
                    with args.out.open("a") as out:
                        out.write(json.dumps(row) + "\n")
                    print(f"{policy:>16} width {config.width:>4} {arm:>5} seed {seed}: val {result.val_accuracy:.4f}"
                          f" stopped at epoch {result.n_epochs} (best {row['best_epoch']}), {result.seconds:.0f} s",
                          flush=True)
                    done.append(row)
    summarize(done[1:])


def summarize(rows: list[dict]) -> None:
    print("\n| policy | width | tuned val | twin val | gain, points (paired, mean ± sd) | epochs tuned / twin |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["width"]), {}).setdefault(r["arm"], {})[r["seed"]] = r
    for (policy, width), arms in groups.items():
        seeds = sorted(set(arms.get("tuned", {})) & set(arms.get("twin", {})))
        if len(seeds) < 2:
            continue
        gains = [100 * (arms["tuned"][s]["val_accuracy"] - arms["twin"][s]["val_accuracy"]) for s in seeds]
        mean = {arm: statistics.fmean(arms[arm][s]["val_accuracy"] for s in seeds) for arm in ("tuned", "twin")}
        epochs = {arm: statistics.fmean(arms[arm][s]["n_epochs"] for s in seeds) for arm in ("tuned", "twin")}
        print(f"| {policy} | {width} | {100 * mean['tuned']:.2f}% | {100 * mean['twin']:.2f}% | "
              f"{statistics.fmean(gains):+.2f} ± {statistics.stdev(gains):.2f} | {epochs['tuned']:.0f} / "
              f"{epochs['twin']:.0f} |")


if __name__ == "__main__":
    main()
