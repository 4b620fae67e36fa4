"""kdtune's command line: `kdtune <command>` or `python cli.py <command>`.

Each command loads the spec, calls the library and prints. Bad input is one line on stderr and exit code 2
(`--debug` shows the traceback); Ctrl-C or SIGTERM during `tune` keeps every finished trial and exits 130.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import signal
import sys
from pathlib import Path

import optuna

from kdtune import (
    artifacts,
    dashboard,
    data,
    export,
    figures,
    front,
    hardware,
    predict,
    report,
    runtime,
    student,
    study,
    study_setup,
    target,
    teacher,
    teacher_sources,
    workers,
)
from kdtune.budget import Budget
from kdtune.errors import EXIT_USAGE, USER_ERRORS, one_line
from kdtune.spec import DEFAULT_SPEC, Spec, SpecError, load_spec
from kdtune.student import StudentConfig

EXIT_INTERRUPTED = 130


def cmd_teacher(args: argparse.Namespace) -> int:
    """Train the teacher with early stopping on validation accuracy (or take the one the spec gives: weights or
    logits) and cache it with its logits.

    A cached teacher for the same data, teacher config and seed is reused at once; --force retrains it.
    --logits-out FILE.npz writes its logits as `[teacher] logits` reads them, to share or to check that path.
    """
    spec = _spec(args)
    if args.logits_out and args.logits_out.suffix != ".npz":  # numpy.savez would add .npz to any other name
        raise SpecError(f"--logits-out {args.logits_out} must name an .npz file.")
    splits = data.prepare(spec.data, spec.seed)
    cached = teacher.load_or_train(spec, splits, _compute(spec), force=args.force)
    trained = (f"{cached.meta['n_epochs']} epochs, {cached.meta['seconds']:.0f} s to train" if cached.meta["n_epochs"]
               else "not trained here: " + ("given as logits" if cached.n_parameters is None else "given as weights"))
    print(f"Teacher {cached.cache_id}: validation accuracy {cached.val_accuracy:.4f} ({trained}), cached in "
          f"{cached.folder}.")
    if args.logits_out:
        teacher_sources.write_logits(cached.logits, splits, args.logits_out)
        print(f"Written: {args.logits_out} (use it as [teacher] logits = \"{args.logits_out}\").")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Run (or resume) the Optuna study over temperature, lambda and width until it holds --trials finished trials.

    Every trial trains a student on the cached teacher logits and is pruned on validation accuracy.
    """
    spec = _spec(args)
    if spec.onnxruntime_latency:
        runtime.require("onnxruntime_latency = true")
    splits = data.prepare(spec.data, spec.seed)
    compute = _compute(spec)
    try:
        the_study = study.open_study(spec, create=True)  # before the teacher: a bad storage URL fails at once
    except KeyboardInterrupt:
        print(f"\nInterrupted while opening the study. Resume with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    interrupted = False
    try:
        cached = study_setup.set_up(the_study, spec, splits, compute)
        already = target.n_finished(the_study)
        print(f"Study {spec.name!r} in {spec.storage_url}: {already} finished trials, running to {args.trials}. "
              f"Teacher validation accuracy {cached.val_accuracy:.4f}.")
        if args.jobs == 1:
            objective = study.make_objective(spec, splits, cached, compute, args.trials)
            target.run(the_study, objective, n_trials=args.trials, timeout=args.timeout)
        else:
            exit_codes = workers.run_workers(spec, n_trials=args.trials, timeout=args.timeout, n_workers=args.jobs)
            if EXIT_USAGE in exit_codes:
                return EXIT_USAGE  # the worker printed its one-line error
            if any(exit_codes):  # on a line of its own: a killed worker 0 leaves its progress bar unfinished
                print(file=sys.stderr)
            for number, code in enumerate(exit_codes):
                if code != 0:
                    print(f"worker {number} ended with {_exit_reason(code)}; a trial it was running is failed "
                          f"after {spec.workers.grace_seconds} s and retried.", file=sys.stderr)
            # Ctrl-C reaches the workers directly; they stop, keeping their finished trials
            interrupted = args.timeout is None and target.n_finished(the_study) < args.trials
    except KeyboardInterrupt:
        interrupted = True
    dashboard.note_study(the_study)
    if interrupted:
        print(f"\nInterrupted: {target.n_finished(the_study)} finished trials are kept in {spec.storage_url}. "
              f"Resume with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    states = [t.state for t in the_study.get_trials(deepcopy=False)]
    n_pruned, n_failed = states.count(optuna.trial.TrialState.PRUNED), states.count(optuna.trial.TrialState.FAIL)
    print(f"{target.n_finished(the_study)} finished trials ({n_pruned} pruned, {n_failed} failed).")
    _print_best(study.best(the_study))
    print(f"Browse: {_command(args, 'dashboard')}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Print the best trial so far: temperature, lambda, width, validation accuracy, trial number, parameters;
    and the size front: the best trial of each size band.

    --max-params and --max-latency-ms give the best trial within that budget instead.
    """
    spec = _spec(args)
    found = study.best(study.open_study(spec, create=False, read_only=True), _budget(args))
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        _print_best(found)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Pick each size band's winner over fresh seeds on validation, then test it against its no-distillation twin
    (the size front), and the overall winner against the seed project's configuration.

    Each band's top configurations are retrained over --seeds seeds and its winner is chosen on validation
    accuracy; the test set is read only for the band winners, their twins and the reference. Writes
    studies/<name>/report.md and .json, and with kdtune[plots] the pictures (figures/*.png) and one
    self-contained report.html. --figures-only redraws the pictures from the last report without training
    anything.
    """
    spec = _spec(args)
    the_study = study.open_study(spec, create=False)
    if args.figures_only:
        if lacking := figures.missing_libraries():
            raise SpecError(f"drawing pictures needs {' and '.join(lacking)}: {figures.INSTALL_HINT}")
        result = report.read(spec)
    else:
        splits = data.prepare(spec.data, spec.seed)
        compute = _compute(spec)
        cached = study_setup.teacher_of(the_study, spec, splits, compute)
        print(f"Retraining the top {spec.report.n_candidates} configurations of each size band x "
              f"{spec.report.n_seeds} seeds to pick each band's winner on validation, then each winner and its "
              "no-distillation twin" + (", and the reference," if student.runs_reference(spec.student) else "")
              + " on the test set:")
        try:
            result = report.evaluate(spec, splits, cached, the_study, compute, budget=_budget(args))
        except KeyboardInterrupt:
            print(f"\nInterrupted: the students trained so far are kept in {report.runs_folder(spec)}. "
                  f"Resume with: {_command(args, 'report', *_report_flags(args))}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        print(report.to_markdown(result))
        the_study.set_user_attr(dashboard.REPORT_NOTE_KEY, f"Report of {result['created']}:\n\n"
                                + report.test_section(result))
        dashboard.note_study(the_study)
    written = report.write(result, spec, the_study)
    print("Written: " + ", ".join(str(path) for path in written))
    if lacking := figures.missing_libraries():
        print(f"Pictures not drawn ({', '.join(lacking)} missing): {figures.INSTALL_HINT}, then "
              f"{_command(args, 'report', '--figures-only')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Ship the report's student: ONNX (checked against PyTorch on the test images), its weights, its latency in
    PyTorch and ONNX Runtime, and a model card.

    By default the report's overall winner; with --max-params or --max-latency-ms the band winner with the best
    validation accuracy within that budget; with --trial K the band winner of trial K. Of its seeds, the one with
    the best validation accuracy. Nothing is retrained: run `report` first. Writes to --out (default
    studies/<name>/export/trial-<K>/) and adds the files to the study's artifacts and the trial's note.
    """
    spec = _spec(args)
    runtime.require("kdtune export")
    found = report.read(spec)
    chosen = export.choose(found, _budget(args), args.trial)
    folder = args.out or export.default_folder(spec, chosen)
    the_study = study.open_study(spec, create=False)
    card = export.export(spec, found, chosen, data.prepare(spec.data, spec.seed), folder)
    published = artifacts.publish_export(the_study, spec, folder)
    summary = export.summary(card, folder, published)
    dashboard.note_export(the_study, chosen.band["winner_trial"], summary)
    print(summary)
    print(f"Use it: kdtune predict --model {folder} IMAGES.npz")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict classes with an exported student in ONNX Runtime: an .npz of images (`images`, optionally
    `labels`), an .npy of images, or one image file.

    Prints each image's class and its probability (the first --show), and the accuracy where the file has
    labels; --out FILE.csv writes every image's class and class probabilities.
    """
    found = predict.predict(args.model, args.images, args.threads)
    names = found["class_names"]
    for index, (label, probs) in enumerate(zip(found["predicted"][:args.show], found["probabilities"])):
        print(f"image {index}: class {label}{f' ({names[label]})' if names else ''} (probability {probs[label]:.3f})")
    if found["n_images"] > args.show:
        print(f"... and {found['n_images'] - args.show:,} more images")
    if "accuracy" in found:
        print(f"Accuracy on the {found['n_images']:,} labelled images: {100 * found['accuracy']:.2f}%")
    if args.out:
        predict.write_csv(found, args.out)
        print(f"Written: {args.out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """List the study's trials by state and what will be retried.

    States: complete, pruned, failed, running, stale, waiting. A trial whose worker died goes stale, is failed
    after the grace period, and its configuration is queued again (waiting).
    """
    spec = _spec(args)
    found = workers.trial_status(study.open_study(spec, create=False, read_only=True))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"Study {spec.name!r} in {spec.storage_url}: " + ", ".join(f"{n} {s}" for s, n in found["counts"].items()))
    for trial in found["running"]:
        state = f"stale: no heartbeat for {spec.workers.grace_seconds} s" if trial["stale"] else "running"
        print(f"  trial {trial['trial']}: {state} on {trial['worker']}, started {trial['started']}, "
              f"{trial['epochs_reported']} epochs reported")
    for retry in found["retries"]:
        print(f"  trial {retry['trial']}: waiting, will retry the configuration of failed trial {retry['retries']}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the study in optuna-dashboard until Ctrl-C: its trials with their notes and learning curves, and
    the study's note with the best configuration, the teacher and, after `report`, the test table.

    It listens on 127.0.0.1 unless --host says otherwise, and warns when it is reachable from other machines.
    """
    spec = _spec(args)
    the_study = study.open_study(spec, create=False, read_only=True)
    try:
        dashboard.serve(spec, the_study, args.host, args.port)
    except KeyboardInterrupt:
        print("Dashboard stopped.")
    return 0


COMMANDS = {"teacher": cmd_teacher, "tune": cmd_tune, "best": cmd_best, "status": cmd_status,
            "report": cmd_report, "export": cmd_export, "predict": cmd_predict, "dashboard": cmd_dashboard}
TRAINING_COMMANDS = ("teacher", "tune", "report")
STUDY_FREE_COMMANDS = ("predict",)  # needs an exported folder, not a spec or a study


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdtune", description=inspect.getdoc(sys.modules[__name__]).splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        doc = inspect.getdoc(command)
        sub = commands.add_parser(name, help=first_sentence(doc), description=doc)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        if name in STUDY_FREE_COMMANDS:
            continue
        sub.add_argument("--spec", type=Path, help=f"study spec TOML (default: {DEFAULT_SPEC}, or the built-in "
                         "quickstart where that file is absent)")
        if name != "teacher":
            sub.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<name>/study.db)")
            sub.add_argument("--study-name", help="study name (default: the spec's name)")
    for name in (*TRAINING_COMMANDS, "export"):  # export times the student
        commands.choices[name].add_argument("--threads", type=_positive(int), help="torch threads (default: one per "
                                            "CPU this process may use, counting a container's CPU quota)")
    commands.choices["teacher"].add_argument("--force", action="store_true", help="retrain even if cached")
    commands.choices["teacher"].add_argument("--logits-out", type=Path, metavar="FILE.npz",
                                             help="also write the teacher's logits as [teacher] logits reads them")
    tune = commands.choices["tune"]
    tune.add_argument("--trials", type=_positive(int), default=100, help="finished trials to reach (default 100)")
    tune.add_argument("--timeout", type=_positive(float), help="stop starting new trials after this many seconds")
    tune.add_argument("--jobs", type=_positive(int), default=1, help="worker processes sharing the study on this "
                      "machine, each with its share of the CPUs (default 1)")
    for name in ("best", "status"):
        commands.choices[name].add_argument("--json", action="store_true", help="print JSON")
    for name in ("best", "report", "export"):
        chooser = commands.choices[name]
        chooser.add_argument("--max-params", type=_positive(int), help="only students with at most this many "
                             "parameters")
        chooser.add_argument("--max-latency-ms", type=_positive(float), help="only students that take at most this "
                             "many milliseconds per image at batch 1 (as timed on their CPU)")
        chooser.add_argument("--latency-runtime", choices=("pytorch", "onnxruntime"), default="pytorch",
                             help="whose latency --max-latency-ms limits (default pytorch; onnxruntime: as timed "
                             "where the spec has onnxruntime_latency = true, and for the report's band winners)")
    commands.choices["export"].add_argument("--trial", type=_natural, help="the report's band winner of this trial")
    commands.choices["export"].add_argument("--out", type=Path, help="folder to write (default: "
                                            "studies/<name>/export/trial-<K>)")
    prediction = commands.choices["predict"]
    prediction.add_argument("images", type=Path, help=".npz (images, optionally labels), .npy or an image file")
    prediction.add_argument("--model", type=Path, required=True, help="a folder `kdtune export` wrote")
    prediction.add_argument("--out", type=Path, help="write every prediction to this CSV file")
    prediction.add_argument("--show", type=_natural, default=10, help="images to print (default 10)")
    prediction.add_argument("--threads", type=_positive(int), help="ONNX Runtime threads (default: one per CPU this "
                            "process may use)")
    commands.choices["report"].add_argument("--seeds", type=_positive(int), help="seeds per configuration")
    commands.choices["report"].add_argument("--figures-only", action="store_true", help="redraw the pictures and "
                                            "report.html from the last report; trains nothing")
    commands.choices["dashboard"].add_argument("--host", default="127.0.0.1", help="address to listen on "
                                               "(default 127.0.0.1: this machine only)")
    commands.choices["dashboard"].add_argument("--port", type=_port, default=8080,
                                               help="default 8080; 0 takes a free port")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers.set_up_process(getattr(args, "threads", None))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # tune handles its own; elsewhere nothing is half-written (caches write atomically)
        print(f"kdtune {args.command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"kdtune {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


def _spec(args: argparse.Namespace) -> Spec:
    return load_spec(args.spec, storage=getattr(args, "storage", None), name=getattr(args, "study_name", None),
                     report_n_seeds=getattr(args, "seeds", None))


def _compute(spec: Spec) -> hardware.Compute:
    """The spec's device and precision resolved for this machine, once per command, then passed down."""
    return hardware.resolve_compute(spec.device, spec.precision)


def _report_flags(args: argparse.Namespace) -> list[str]:
    """The flags that decide what `report` trains, for the command that resumes it."""
    values = {"--seeds": args.seeds, "--max-params": args.max_params, "--max-latency-ms": args.max_latency_ms,
              "--latency-runtime": None if args.latency_runtime == "pytorch" else args.latency_runtime}
    return [f"{flag} {value}" for flag, value in values.items() if value is not None]


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(max_params=args.max_params, max_latency_ms=args.max_latency_ms, runtime=args.latency_runtime)


def first_sentence(doc: str) -> str:
    """A command's summary for `kdtune --help`: its docstring's first sentence, however many lines it spans."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return paragraph.split(". ")[0].removesuffix(".") + "."


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (0 < value < math.inf):  # also refuses nan, which compares false with everything
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _print_best(found: dict) -> None:
    config = StudentConfig.from_params(found)
    print(f"Best: trial {found['trial']}: temperature={config.temperature:.3f} lambda={config.label_weight:.3f} "
          f"width={config.width} loss={config.loss_label} val_accuracy={found['val_accuracy']:.4f} "
          f"({found['n_parameters']:,} student parameters)")
    print("The size front, the best trial of each size band (on validation):\n" + front.to_markdown(found["front"]))


def _exit_reason(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _resume_command(args: argparse.Namespace) -> str:
    return _command(args, "tune", f"--trials {args.trials}")


def _command(args: argparse.Namespace, command: str, *flags: str) -> str:
    """The kdtune command line that runs `command` on the same study as this one."""
    parts = [f"kdtune {command}"] + [f"--spec {args.spec}"] * bool(args.spec) + list(flags)
    parts += [f"--storage {args.storage}"] * bool(args.storage) + [f"--study-name {args.study_name}"] * bool(
        args.study_name)
    return " ".join(parts)
