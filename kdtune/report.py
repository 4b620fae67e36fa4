"""The final, honest comparison: the only place kdtune reads the test set.

Band by band (kdtune.bands: a study is a question about students of each size):

1. Noise-aware winner: the band's top-k configurations by validation accuracy are retrained with K fresh seeds
   (not the seed the search used, so a configuration that won by a lucky seed does not keep its luck); the
   band's winner has the best mean validation accuracy, ties going to the smaller student.
2. Only each band's winner and its no-distillation twin (same width, lambda = 1), and the seed project's
   configuration, are evaluated on the test set; the study records that it was read, for which
   configurations, and when. The overall winner is the band winner with the best validation mean.
3. The distillation gain is paired over seeds: same seed, same initial weights and batch order, with and
   without the teacher; each band gets its gain, interval and finding, the front its verdict by size. This is
   the report's primary comparison, one per band, read on its own 95% interval.
4. Where a band's winner uses another loss form than Hinton's, it is also compared with the band's best
   Hinton-loss configuration (chosen on validation over the same fresh seeds), paired on the test set. These
   secondary comparisons, one per such band, are corrected together for multiplicity (Holm), so that a study
   searching several forms does not find a "better loss" by chance in one band of many.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from pathlib import Path

import optuna

from kdtune import cost, figures, front, pruner_replay, runtime, saved_runs, student
from kdtune.bands import Band
from kdtune.budget import Budget
from kdtune.data import Splits
from kdtune.hardware import Compute
from kdtune.losses import UNLABELLED, WITHOUT_TEMPERATURE
from kdtune.provenance import machine, versions
from kdtune.spec import Spec, SpecError, to_toml_dict
from kdtune.student import REFERENCE, StudentConfig
from kdtune.study import students_compute
from kdtune.teacher import CachedTeacher
from kdtune.train import accuracy, accuracy_of_logits
from kdtune.transfer import StudentData


def runs_folder(spec: Spec) -> Path:
    """Where the students this report trains are kept, so that a stopped report resumes."""
    return spec.output_dir / "report-runs"


def twin_of(winner: StudentConfig) -> StudentConfig:
    """The same student trained without distillation: the counterfactual of a gain."""
    return dataclasses.replace(winner, label_weight=1.0, loss="hinton", extras=())


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean and its two-sided Student-t confidence interval: of paired differences, the paired interval."""
    mean = statistics.fmean(values)
    if len(set(values)) == 1:  # no spread (of paired differences: the winner does not distil), no interval
        return mean, mean, mean
    # imported here: scipy.stats costs ~1.3 s to import, on every kdtune command; scipy.special ~0.5 s, on report only
    from scipy.special import stdtrit  # the Student-t quantile
    half = stdtrit(len(values) - 1, 0.5 + confidence / 2) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def top_configurations(trials: list[optuna.trial.FrozenTrial], n: int) -> list[tuple[int, StudentConfig]]:
    """(trial number, config) of the n best distinct configurations among `trials` by validation accuracy."""
    found: dict[StudentConfig, int] = {}
    for trial in sorted(trials, key=lambda t: t.value, reverse=True):
        found.setdefault(StudentConfig.from_trial(trial), trial.number)
        if len(found) == n:
            break
    return [(number, config) for config, number in found.items()]


def paired_p_value(differences: list[float]) -> float:
    """The two-sided p-value of the paired t-test that the mean difference is zero."""
    mean = statistics.fmean(differences)
    if len(set(differences)) == 1:  # no spread: certain, either way
        return 1.0 if mean == 0 else 0.0
    from scipy.special import stdtr  # the Student-t distribution function (see mean_interval on the import)
    t = mean / (statistics.stdev(differences) / math.sqrt(len(differences)))
    return float(2 * stdtr(len(differences) - 1, -abs(t)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the family-wise error of the comparisons whose
    adjusted p is below alpha stays below alpha (Holm 1979)."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def pick_winner(candidates: list[dict]) -> dict:
    """The best mean validation accuracy over seeds; on a tie, the smaller student."""
    return max(candidates, key=lambda c: (c["val_mean"], -c["n_parameters"]))


def evaluate(spec: Spec, splits: Splits, teacher: CachedTeacher, study: optuna.Study, compute: Compute,
             echo=print, budget: Budget = Budget()) -> dict:
    """The report, band by band: each size band's winner over fresh seeds against its no-distillation twin on
    the test set, and the overall winner (the best band winner) against the reference too. With a `budget`,
    only trials within it take part."""
    data = StudentData.build(splits, teacher.logits["train"], spec.transfer, spec.seed, compute.device)
    architecture = student.Architecture.of(spec.student, data.input_shape, data.n_classes)
    compute = students_compute(study, compute)

    @functools.cache
    def compute_for(width: int) -> Compute:
        return architecture.compute_for(width, compute)

    seeds = [spec.seed + 1 + i for i in range(spec.report.n_seeds)]
    started = time.perf_counter()

    # the student's family and depth enter only away from their defaults: runs saved before they existed still fit
    students = {key: value for key, value in dataclasses.asdict(spec.student).items()
                if (key, value) not in (("family", "mlp"), ("depth", 1), ("lr_schedule", "constant"))}
    if "source_sha256" in (record := architecture.as_record()):  # an edited user family builds other students
        students["source_sha256"] = record["source_sha256"]
    context = {"student": students, "transfer": dataclasses.asdict(spec.transfer),
               "data": splits.fingerprint, "teacher": teacher.cache_id}

    def context_of(config: StudentConfig) -> dict:
        """What a saved run of `config` depends on: the precision it trains in is the student's own."""
        return {**context, "precision": compute_for(config.width).precision}

    # A configuration can be both a candidate and an arm (the twin of a winner that does not distil, the
    # reference among the top trials): each run is trained or loaded once per report and then reused, so a
    # run this report trained is never reloaded and counted as from an earlier report.
    @functools.cache
    def run_for(config: StudentConfig, seed: int) -> tuple[saved_runs.Run, bool]:
        return saved_runs.trained(
            runs_folder(spec), context_of(config), config.as_params(), seed, compute.device,
            build=lambda: architecture.build(config.width),
            train=lambda: student.train(config, architecture, spec.student, data, seed, compute_for(config.width)))

    def train_over_seeds(name: str, config: StudentConfig) -> list[saved_runs.Run]:
        fetched = [run_for(config, seed) for seed in seeds]
        runs = [run for run, _ in fetched]
        n_from_earlier = sum(from_earlier for _, from_earlier in fetched)
        echo(f"  {name:<40} val accuracy " + " ".join(f"{r.val_accuracy:.4f}" for _, r in runs)
             + (f"  ({n_from_earlier} of {len(runs)} from an earlier report)" if n_from_earlier else ""))
        return runs

    x_test, y_test = splits.x_test.to(compute.device), splits.y_test.to(compute.device)

    def test_row(name: str, config: StudentConfig, runs: list[saved_runs.Run] | None = None) -> dict:
        """The test set, read for one arm over the report's seeds."""
        runs = runs or train_over_seeds(name, config)
        tests = [accuracy(model, x_test, y_test, compute_for(config.width).autocast_dtype) for model, _ in runs]
        return {"config": config.as_params(), "test_accuracy": tests,
                "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests),
                "val_accuracy": [r.val_accuracy for _, r in runs],
                "val_mean": statistics.fmean(r.val_accuracy for _, r in runs),
                # the trained students, seed by seed, for `export`: names in runs_folder(spec)
                "run_files": [saved_runs.path_of(runs_folder(spec), context_of(config), config.as_params(), seed).name
                              for seed in seeds],
                "val_curves": [r.val_curve for _, r in runs],
                "n_parameters": architecture.n_parameters(config.width),
                "precision": compute_for(config.width).precision}  # trained and tested in it

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise SpecError(f"study {study.study_name!r} has no completed trial yet; run `kdtune tune`.")
    budget.select(complete, study.study_name)  # a budget no trial meets: one line naming what the study holds

    # 1. each band's winner, chosen on validation accuracy over seeds among the band's own top trials; 2. the
    # test set, read for the band winner and its twin
    bands_found, candidates, teacher_test = [], [], accuracy_of_logits(teacher.logits["test"], splits.y_test)

    def candidate(band: Band, number: int, config: StudentConfig) -> tuple[dict, list[saved_runs.Run]]:
        """A configuration retrained over the report's seeds, and its validation accuracy over them."""
        runs = train_over_seeds(f"{band.label}: trial {number}", config)
        vals = [r.val_accuracy for _, r in runs]
        return {"trial": number, "band": band.index, "config": config.as_params(), "val_mean": statistics.fmean(vals),
                "val_std": statistics.stdev(vals), "n_parameters": architecture.n_parameters(config.width)}, runs

    def paired(rows: dict, arm: str) -> dict:
        """The tuned winner's test accuracy minus `arm`'s, seed by seed, with its interval."""
        differences = [a - b for a, b in zip(rows["tuned"]["test_accuracy"], rows[arm]["test_accuracy"])]
        mean, low, high = mean_interval(differences)
        return {"mean": mean, "ci95_low": low, "ci95_high": high, "paired_differences": differences}

    # pruned trials too: successive halving ranks a rung among every trial that reached it
    finished_by_band = {band.index: trials for band, trials in front.finished_by_band(study, budget)}
    for band, trials in front.complete_by_band(study, budget):
        top = top_configurations(trials, spec.report.n_candidates)
        band_candidates, candidate_runs = [], {}
        for number, config in top:
            found, candidate_runs[number] = candidate(band, number, config)
            band_candidates.append(found)
        winner = pick_winner(band_candidates)
        winner_config = dict(top)[winner["trial"]]
        rows = {"tuned": test_row("tuned", winner_config, candidate_runs[winner["trial"]]),
                "no_distillation": test_row(f"{band.label}: no distillation", twin_of(winner_config))}
        gain = paired(rows, "no_distillation")
        candidates += band_candidates
        found = {
            "band": band.index, "band_label": band.label, "min_params": band.min_params,
            "max_params": band.max_params, "winner_trial": winner["trial"], "winner_val_mean": winner["val_mean"],
            "loss": winner_config.loss, "rows": rows, "gain": gain,
            "latency": cost.of_student(architecture, winner_config.width, onnxruntime=not runtime.missing_packages()),
            "finding": finding(gain["mean"], gain["ci95_low"], gain["ci95_high"], winner_config.distils)}
        searched = next(t for t in trials if t.number == winner["trial"])
        if searched.intermediate_values:  # trials added by hand (tests, imports) may have no curve
            found["pruned_at_epoch"] = pruner_replay.pruned_at_epoch(spec, searched, finished_by_band[band.index])
        # 4. a winner of another loss form against the band's best Hinton-loss configuration
        if winner_config.distils and winner_config.loss != "hinton":
            hinton = best_hinton(band_candidates, trials)
            if hinton is not None:
                number, config = hinton["trial"], StudentConfig.from_params(hinton["config"])
                if number not in candidate_runs:  # not among the band's top: retrained over the seeds
                    hinton, candidate_runs[number] = candidate(band, number, config)
                rows["best_hinton"] = test_row(f"{band.label}: best hinton", config, candidate_runs[number])
                found["vs_hinton"] = {"trial": number, "val_mean": hinton["val_mean"], **paired(rows, "best_hinton")}
        bands_found.append(found)
    compare_with_hinton(bands_found)

    # 3. the overall winner, the best band winner on validation, also against the seed project's configuration
    overall = best_band(bands_found)
    rows, read = dict(overall["rows"]), {f"{b['band_label']}: {arm}": row for b in bands_found
                                         for arm, row in b["rows"].items()}
    if student.runs_reference(spec.student):  # the seed project's configuration is an MLP of one layer
        rows["reference"] = read["reference"] = test_row("reference", REFERENCE)
    record_test_read(study, read)
    winner_config = StudentConfig.from_params(rows["tuned"]["config"])
    return {
        "study": study.study_name, "seeds": seeds, "candidates": candidates, "winner_trial": overall["winner_trial"],
        "budget": str(budget),
        "teacher": {"cache_id": teacher.cache_id, "n_parameters": teacher.meta["n_parameters"],
                    "val_accuracy": teacher.val_accuracy, "test_accuracy": teacher_test},
        "class_names": splits.class_names,
        "students": {"n_labelled": int((data.y_train != UNLABELLED).sum()),
                     "n_unlabelled": int((data.y_train == UNLABELLED).sum())},
        "rows": rows, "gain": overall["gain"], "front": bands_found,
        "temperature_by_band": temperature_by_band(study, budget),
        "verdict": verdict(overall["gain"]["mean"], overall["gain"]["ci95_low"], overall["gain"]["ci95_high"],
                           teacher_lead=teacher_test - rows["no_distillation"]["test_mean"],
                           winner_distils=winner_config.distils),
        "front_verdict": front_verdict(bands_found), "loss_verdict": loss_verdict(bands_found),
        "pruner_replay": pruner_replay.summary(bands_found, spec.search.pruner),
        "seconds": round(time.perf_counter() - started, 1), "spec": to_toml_dict(spec),
        "data_fingerprint": splits.fingerprint, "versions": versions(), "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def best_hinton(band_candidates: list[dict], trials: list[optuna.trial.FrozenTrial]) -> dict | None:
    """The band's best distilling Hinton-loss configuration: the best such candidate over the report's seeds,
    else the band's best such trial by its search value (as a candidate entry still to be retrained), else
    None (the study did not try Hinton's loss in this band)."""
    of_hinton = [c for c in band_candidates if c["config"]["loss"] == "hinton" and c["config"]["lambda"] < 1.0]
    if of_hinton:
        return pick_winner(of_hinton)
    searched = [t for t in trials if (config := StudentConfig.from_trial(t)).loss == "hinton" and config.distils]
    if not searched:
        return None
    [(number, config)] = top_configurations(searched, 1)
    return {"trial": number, "config": config.as_params()}


def compare_with_hinton(bands_found: list[dict], alpha: float = 0.05) -> None:
    """Each band's comparison of its winner with its best Hinton-loss configuration, in place: the paired
    t-test's p-value, Holm-adjusted over the bands that have one, and its finding."""
    compared = [b for b in bands_found if "vs_hinton" in b]
    p_values = [paired_p_value(b["vs_hinton"]["paired_differences"]) for b in compared]
    for b, p, adjusted in zip(compared, p_values, holm(p_values)):
        mean = b["vs_hinton"]["mean"]
        b["vs_hinton"].update(p_value=p, p_holm=adjusted, n_compared=len(compared), finding=(
            f"{b['loss']} beats Hinton's loss" if adjusted < alpha and mean > 0 else
            f"{b['loss']} is behind Hinton's loss" if adjusted < alpha else
            f"{b['loss']} does not beat Hinton's loss distinguishably"))


def loss_verdict(bands_found: list[dict]) -> str:
    """Which loss forms won the bands, and whether any beats Hinton's, in a sentence or two."""
    others = [b for b in bands_found if b.get("loss", "hinton") != "hinton"]
    if not others:
        return "Every band's winner uses Hinton's loss."
    compared = [b for b in others if "vs_hinton" in b]
    said = (f"{len(others)} of {len(bands_found)} band winners use another loss form than Hinton's ("
            + ", ".join(f"{b['band_label']}: {b['loss']}" for b in others) + ").")
    if not compared:
        return said + " The study tried no distilling Hinton-loss configuration in those bands to compare with."

    def detail(some: list[dict]) -> str:
        return "; ".join(f"{b['band_label']}: {100 * b['vs_hinton']['mean']:+.2f} points, Holm-adjusted p = "
                         f"{b['vs_hinton']['p_holm']:.2g}" for b in some)

    def finding_ends(end: str) -> list[dict]:
        return [b for b in compared if b["vs_hinton"]["finding"].endswith(end)]

    beats, behind = finding_ends("beats Hinton's loss"), finding_ends("is behind Hinton's loss")
    if not beats and not behind:
        return (f"{said} None of them beats the band's best Hinton-loss configuration distinguishably on the test "
                f"set ({detail(compared)}): at these sizes another loss form is no better than Hinton's.")
    level = [b for b in compared if b not in beats and b not in behind]
    groups = (("beats it", beats), ("is behind it", behind), ("is not distinguishable from it", level))
    return (f"{said} Against the band's best Hinton-loss configuration, with Holm's correction over the "
            f"{len(compared)} comparisons, the winner's form "
            + "; ".join(f"{verb} in {len(some)} ({detail(some)})" for verb, some in groups if some) + ".")


def best_band(bands_found: list[dict]) -> dict:
    """The band whose winner has the best validation mean; on a tie, the smaller student."""
    return max(bands_found, key=lambda b: (b["winner_val_mean"], -b["rows"]["tuned"]["n_parameters"]))


def record_test_read(study: optuna.Study, rows: dict) -> None:
    """Append to the study's log of test-set reads: a study whose test set was read many times is suspect."""
    reads = study.user_attrs.get("test_reads", [])
    reads.append({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "configs": {name: row["config"] for name, row in rows.items()}})
    study.set_user_attr("test_reads", reads)


def temperature_by_band(study: optuna.Study, budget: Budget = Budget(), n_top: int = 5) -> dict:
    """Does the best temperature depend on the student's size here? (Hinton et al. 2015: small students
    preferred T of about 2.5-4, large ones anything above 8.) The temperatures of each size band's top
    distilling trials, and whether the narrowest and the widest band's ranges are apart. Hinton-loss trials
    only: another form's temperature (DIST's tau, LS-KD's base temperature) is another quantity."""
    found = []
    for band, trials in front.complete_by_band(study, budget):
        distilling = [t for t in trials if (config := StudentConfig.from_trial(t)).distils and config.loss == "hinton"
                      and not t.user_attrs.get("control")]
        if len(distilling) < 3:  # too few to speak of a range
            continue
        temps = sorted(t.params["temperature"] for t in sorted(distilling, key=lambda t: t.value)[-n_top:])
        found.append({"band": band.index, "band_label": band.label, "n": len(temps), "low": temps[0],
                      "high": temps[-1], "median": statistics.median(temps)})
    if len(found) < 2:
        return {"bands": found, "statement": "Too few size bands with 3 or more distilling Hinton-loss trials to "
                                             "tell whether the best temperature depends on size."}
    narrow, wide = found[0], found[-1]
    apart = narrow["high"] < wide["low"] or wide["high"] < narrow["low"]
    ranges = "; ".join(f"{b['band_label']}: T {b['low']:.2g}-{b['high']:.2g} (median {b['median']:.2g} of "
                       f"{b['n']})" for b in found)
    statement = (f"The top (up to {n_top}) distilling Hinton-loss trials of each size band with at least 3: {ranges}. "
                 + ("The narrowest and the widest of these bands do not overlap: the best temperature depends on "
                    "size in this study." if apart else "The narrowest and the widest of these bands overlap: no "
                    "size dependence of the best temperature is visible here."))
    return {"bands": found, "depends_on_size": apart, "statement": statement}


def finding(gain: float, low: float, high: float, distils: bool) -> str:
    """What distillation does in one size band, in a few words."""
    if not distils:
        return "no gain: the best configuration does not distil"
    if low > 0:
        return "distillation pays"
    if high < 0:
        return "distillation hurts"
    return "no gain distinguishable from seed noise"


def front_verdict(bands_found: list[dict]) -> str:
    """The verdict per size, then how many bands distillation pays in."""
    def points(b: dict) -> str:
        g = b["gain"]
        return f"{100 * g['mean']:+.2f} points, 95% CI {100 * g['ci95_low']:+.2f} to {100 * g['ci95_high']:+.2f}"

    per_band = "; ".join(f"{b['band_label']}: {b['finding']} ({points(b)})" for b in bands_found)
    n_pays = sum(b["finding"] == "distillation pays" for b in bands_found)
    return f"Distillation pays in {n_pays} of {len(bands_found)} size bands. {per_band}."


# What to try when distillation does not pay, with a teacher ahead of the student trained alone or behind it.
ADVICE = ("Train the student alone, or give distillation more to transfer: a stronger teacher (more epochs, more "
          "data than the student's labels), or unlabelled transfer images that only the teacher labels.")
WEAK_TEACHER_ADVICE = ("Train the student alone, or first make the teacher stronger than the student (more epochs, "
                       "more data than the student's labels).")


def teacher_standing(teacher_lead: float) -> str:
    """Where the teacher stands against the student trained alone; `teacher_lead` is the difference in accuracy
    (0.02: 2 points)."""
    if teacher_lead < 0:
        return f"The teacher is {-100 * teacher_lead:.2f} points behind the student trained alone"
    return f"The teacher is {100 * teacher_lead:+.2f} points ahead of the student trained alone"


def weak_teacher_warning(teacher_lead: float) -> str | None:
    """The warning for a teacher behind the student trained alone (on the test set), else None."""
    if teacher_lead >= 0:
        return None
    return f"{teacher_standing(teacher_lead)}: distilling from this teacher cannot be expected to help."


def verdict(gain: float, low: float, high: float, teacher_lead: float, winner_distils: bool = True) -> str:
    points = f"{100 * gain:+.2f} points (95% CI {100 * low:+.2f} to {100 * high:+.2f})"
    warning = weak_teacher_warning(teacher_lead)
    lead_and_advice = f"{warning} {WEAK_TEACHER_ADVICE}" if warning else f"{teacher_standing(teacher_lead)}. {ADVICE}"
    if not winner_distils:
        return f"No gain here: the best configuration on validation does not distil (lambda = 1). {lead_and_advice}"
    if low > 0:
        # a gain measured against the same student alone stands even from a weaker teacher (its soft targets
        # can act as a regulariser): no warning that it cannot help, no advice
        return (f"Distillation pays: the tuned student beats the same student trained alone by {points}. "
                f"{teacher_standing(teacher_lead)}.")
    if high < 0:
        return f"Distillation hurts here: {points} against the same student trained alone. {lead_and_advice}"
    return f"No gain distinguishable from seed noise at 95%: {points}. {lead_and_advice}"


def to_markdown(report: dict) -> str:
    teacher = report["teacher"]
    band_labels = {b["band"]: b["band_label"] for b in report.get("front", [])}
    band_winners = {b["winner_trial"] for b in report.get("front", [])}
    lines = [
        f"# Distillation report: {report['study']}", "",
        f"Students learn from {report['students']['n_labelled']:,} labelled training images"
        + (f" and {report['students']['n_unlabelled']:,} whose labels are withheld (teacher soft targets only)"
           if report["students"]["n_unlabelled"] else "") + "; students without distillation from the labelled "
        "ones only." + (f" Classes: {', '.join(report['class_names'])}." if report.get("class_names") else ""), "",
        f"## Winners on validation (the top configurations of each size band x seeds {report['seeds']}"
        + (f"; budget: {report['budget']}" if report.get("budget", "no budget") != "no budget" else "") + ")", "",
        "| size band | trial | temperature | lambda | width | loss | parameters | val accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["candidates"]:
        mark = (" **overall winner**" if c["trial"] == report["winner_trial"]
                else " **band winner**" if c["trial"] in band_winners else "")
        lines.append(f"| {band_labels.get(c.get('band'), '')} | {c['trial']}{mark} | {_config_cells(c['config'])} | "
                     f"{c['n_parameters']:,} | {100 * c['val_mean']:.2f} ± {100 * c['val_std']:.2f}% |")
    temperature = report.get("temperature_by_band") or report["temperature_by_width"]  # reports before bands
    lines += ["", test_section(report), "",
              f"**Temperature and size.** {temperature['statement']}", "",
              f"Data fingerprint `{report['data_fingerprint'][:16]}`, teacher cache `{teacher['cache_id']}`, "
              f"{report['machine']}, torch {report['versions']['torch']}, optuna {report['versions']['optuna']}, "
              f"{report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def test_section(report: dict) -> str:
    """The test tables and the verdicts: the part of the report that the study's dashboard note repeats."""
    teacher = report["teacher"]
    lines = [] if "front" not in report else [front_section(report), ""]
    lines += [
        "## The overall winner on the test set" + (", with the seed project's configuration"
                                                   if "reference" in report["rows"] else ""), "",
        "| model | temperature | lambda | width | loss | parameters | test accuracy |", "|---|---|---|---|---|---|---|",
        f"| teacher | | | | | {_teacher_size(teacher)} | {100 * teacher['test_accuracy']:.2f}% |",
    ]
    for name, row in report["rows"].items():
        lines.append(f"| {name.replace('_', ' ')} | {_config_cells(row['config'])} | {row['n_parameters']:,} | "
                     f"{100 * row['test_mean']:.2f} ± {100 * row['test_std']:.2f}% |")
    lines += ["", f"**Verdict.** {report['verdict']}"]
    return "\n".join(lines)


def front_section(report: dict) -> str:
    """The size front on the test set: each band's winner against the same student trained alone."""
    teacher = report["teacher"]
    lines = [
        "## The size front on the test set (read only here: each band's winner and its twin)", "",
        "| size band | winner | loss | T | lambda | width | parameters | latency ms (batch 1 / 256) | tuned | "
        "no distillation | gain, points (95% CI) | finding | against the best Hinton-loss configuration |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | | | | | | {_teacher_size(teacher)} | | {100 * teacher['test_accuracy']:.2f}% | | | | |",
    ]
    for b in report["front"]:
        tuned, twin, gain, latency = b["rows"]["tuned"], b["rows"]["no_distillation"], b["gain"], b["latency"]
        config = StudentConfig.from_params(tuned["config"])
        lines.append(
            f"| {b['band_label']} | trial {b['winner_trial']} | {config.loss_label} | {_temperature(config)} | "
            f"{config.label_weight:.3g} "
            f"| {config.width} | {tuned['n_parameters']:,} | {latency['latency_ms_batch1']:.3g} / "
            f"{latency['latency_ms_batch256']:.3g}" + (
                f" (ONNX Runtime {latency['latency_ms_batch1_onnxruntime']:.3g} / "
                f"{latency['latency_ms_batch256_onnxruntime']:.3g})" if "latency_ms_batch1_onnxruntime" in latency
                else "") + f" | {100 * tuned['test_mean']:.2f} ± {100 * tuned['test_std']:.2f}% "
            f"| {100 * twin['test_mean']:.2f} ± {100 * twin['test_std']:.2f}% | {100 * gain['mean']:+.2f} "
            f"({100 * gain['ci95_low']:+.2f} to {100 * gain['ci95_high']:+.2f}) | {b['finding']} | "
            f"{_against_hinton(b)} |")
    latency = report["front"][0]["latency"]
    lines += ["", f"Latency per call, median of {cost.N_TIMED_CALLS}: eager PyTorch, fp32, on {latency['latency_cpu']} "
              f"with {latency['latency_threads']} thread(s)"
              + ("; in parentheses ONNX Runtime, the student exported as it ships (`kdtune export`)."
                 if "latency_ms_batch1_onnxruntime" in latency else "."), "",
              f"**Verdict by size.** {report['front_verdict']}"]
    if "loss_verdict" in report:  # reports before loss forms were searched
        lines += ["", "The gain over the twin is each band's primary comparison (its own 95% interval); the "
                  "comparison with the band's best Hinton-loss configuration (paired over the same seeds) is "
                  "Holm-corrected over the bands that have one.", "", f"**Loss forms.** {report['loss_verdict']}"]
    if "pruner_replay" in report:
        lines += ["", f"**Slow starters.** {report['pruner_replay']}"]
    return "\n".join(lines)


def _against_hinton(band: dict) -> str:
    if band.get("loss", "hinton") == "hinton":
        return "the winner uses it"
    if "vs_hinton" not in band:
        return "none tried in this band"
    h = band["vs_hinton"]
    return (f"trial {h['trial']}: {100 * h['mean']:+.2f} ({100 * h['ci95_low']:+.2f} to {100 * h['ci95_high']:+.2f}),"
            f" Holm p = {h['p_holm']:.2g}: {h['finding']}")


def _temperature(config: StudentConfig) -> str:
    return "-" if config.loss in WITHOUT_TEMPERATURE else f"{config.temperature:.3g}"


def _config_cells(params: dict) -> str:
    config = StudentConfig.from_params(params)
    return f"{_temperature(config)} | {config.label_weight:.3g} | {config.width} | {config.loss_label}"


def write(report: dict, spec: Spec, study: optuna.Study) -> list[Path]:
    """report.json, report.md and, with kdtune[plots], figures/*.png linked from it and the self-contained
    report.html; returns the paths written."""
    folder = spec.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    lacking = figures.missing_libraries()
    if lacking:
        md_path.write_text(markdown + f"\nPictures: not drawn ({', '.join(lacking)} missing): "
                           f"`{figures.INSTALL_HINT}`, then `kdtune report --figures-only`.\n")
        return [md_path, json_path]
    pngs, html_path = figures.write(study, report, markdown, folder)
    md_path.write_text(markdown + "\n## Pictures\n\nInteractive, in one file that opens offline: "
                       "[report.html](report.html).\n\n"
                       + "\n\n".join(f"![{png.stem.replace('-', ' ')}](figures/{png.name})" for png in pngs) + "\n")
    return [md_path, json_path, html_path, *pngs]


def read(spec: Spec) -> dict:
    """The last report of this study, as `write` saved it."""
    path = spec.output_dir / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"no report at {path}: run `kdtune report` first.") from None
    except json.JSONDecodeError as error:
        raise SpecError(f"{path} is not valid JSON ({error.msg}); rerun `kdtune report`.") from error


def _teacher_size(teacher: dict) -> str:
    return "unknown (given as logits)" if teacher["n_parameters"] is None else f"{teacher['n_parameters']:,}"
