"""The study in optuna-dashboard: serving it, and the notes it shows beside Optuna's own charts.

Every trial carries a note: its configuration, size band, parameter count, epochs, seconds, how it ended and its
validation curve. The study's note holds the best configuration so far, the teacher's accuracy, the size front
(the best trial of each band, also drawn as a plot with kdtune[plots]) and,
once `report` has run, its test table with the distillation gain and interval; the best trial's note
repeats that summary below its own facts. Notes live in the study's
storage (optuna-dashboard keeps them as system attributes), so every worker and every viewer sees them.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard
from optuna.trial import TrialState

from kdtune import bands, figures, front
from kdtune.artifacts import open_artifact_store
from kdtune.optuna_compat import live_trial
from kdtune.spec import Spec, SpecError
from kdtune.storage import open_storage
from kdtune.student import StudentConfig

REPORT_NOTE_KEY = "report_note"  # study user attribute: the last report's test table and verdict, in markdown
BEST_NOTED_KEY = "best_trial_noted"  # study user attribute: the trial whose note carries the study's summary
EXPORTS_KEY = "exports"  # study user attribute: {trial number: markdown on its exported student}


def serve(spec: Spec, the_study: optuna.Study, host: str, port: int) -> None:
    """Serve the study's storage and artifacts until Ctrl-C; warn when `host` reaches beyond this machine.
    Port 0 takes a free port; the printed URL names the one taken."""
    if not is_loopback(host):
        print(f"warning: the dashboard on {host} is reachable from other machines and has no login: anyone who "
              "reaches it can read and edit the study. Use --host 127.0.0.1 unless you mean it.", file=sys.stderr)
    app = optuna_dashboard.wsgi(open_storage(spec.storage_url), artifact_store=open_artifact_store(spec))
    try:
        server = make_server(host, port, app, handler_class=QuietHandler)
    except OSError as error:
        raise SpecError(f"cannot serve the dashboard on {host}:{port} ({error.strerror}); choose another --port "
                        "or --host.") from error
    print(f"Dashboard for study {the_study.study_name!r}: http://{host}:{server.server_port}/dashboard/  "
          "(Ctrl-C stops it)", flush=True)
    with server:
        server.serve_forever()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per request would bury the URL
        pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable
        return False


def note_trial(trial: optuna.Trial, config: StudentConfig, **facts) -> None:
    """The trial's note, written as it ends: see `trial_note` for the facts."""
    optuna_dashboard.save_note(trial, trial_note(trial.number, config, **facts))


def trial_note(number: int, config: StudentConfig, *, n_parameters: int, n_epochs: int, seconds: float,
               val_curve: list[float], outcome: str, costs: dict | None = None, band: str | None = None) -> str:
    """`costs`: the trial's user attributes, whose `cost.of_student` keys (absent from older trials) add a
    line on what the student costs to run."""
    curve = ", ".join(f"{100 * value:.2f}" for value in val_curve) or "none (ended before its first epoch)"
    costs = costs or {}
    counted = "uncounted" if costs.get("multiply_adds") is None else f"{costs['multiply_adds']:,}"
    cost_line = [] if "latency_ms_batch1" not in costs else [
        f"- per input: {counted} multiply-adds; CPU latency (median, {costs['latency_threads']} "
        f"threads): {costs['latency_ms_batch1']:.3g} ms at batch 1, {costs['latency_ms_batch256']:.3g} ms at batch 256"]
    return "\n".join([
        f"### Trial {number}: temperature {config.temperature:.3g}, lambda {config.label_weight:.3g}, "
        f"width {config.width}, loss {config.loss_label}",
        "",
        f"- outcome: {outcome}",
        *([f"- size band: {band} (judged among its trials only)"] if band else []),
        f"- student parameters: {n_parameters:,}",
        *cost_line,
        f"- epochs: {n_epochs}, seconds: {seconds:.1f}",
        f"- validation accuracy by epoch (%): {curve}",
    ])


def note_study(the_study: optuna.Study) -> None:
    """Rewrite the study's note, and the best trial's, from what the study holds now: the best trial, the
    teacher, the last report. A trial that is no longer the best gets its own note back."""
    finished = the_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None  # the first of equals, as Optuna's
    if best is not None:
        config = StudentConfig.from_trial(best)
        summary = [f"**Best so far** (of {len(finished)} finished trials, by validation accuracy): trial "
                   f"{best.number}, temperature {config.temperature:.3g}, lambda "
                   f"{config.label_weight:.3g}, width {config.width}, loss {config.loss_label}, "
                   f"{best.user_attrs.get('n_parameters', 0):,} parameters, validation accuracy "
                   f"{100 * best.value:.2f}%."]
    else:
        summary = [f"No completed trial yet ({len(finished)} finished)."]
    teacher_val = the_study.user_attrs.get("teacher_val_accuracy")
    if teacher_val is not None:
        summary += ["", f"Teacher validation accuracy: {100 * teacher_val:.2f}%."]
    entries = front.best_per_band(the_study)
    if entries:
        summary += ["", "**The size front**: the best trial of each size band, on validation (one seed; the "
                    "report retrains them over fresh seeds).", "", front.to_markdown(entries)]
        if importlib.util.find_spec("plotly") is not None:  # kdtune[plots]
            chart = figures.search_front(the_study, teacher_val)
            optuna_dashboard.save_plotly_graph_object(the_study, figures.chart_to_plotly(chart),
                                                      graph_object_id="size-front")
    summary += ["", the_study.user_attrs.get(REPORT_NOTE_KEY,
                                             "No report yet: `kdtune report` adds the test table here.")]
    optuna_dashboard.save_note(the_study, "\n".join([f"## {the_study.study_name}", "", *summary]))
    if best is None:
        return
    previous = the_study.user_attrs.get(BEST_NOTED_KEY)
    if previous is not None and previous != best.number:
        formerly_best = next(t for t in complete if t.number == previous)
        _save_finished_trial_note(the_study, formerly_best, _complete_trial_note(the_study, formerly_best))
    _save_finished_trial_note(the_study, best, "\n".join([_complete_trial_note(the_study, best), "", "---", "",
                                                          "#### The best trial of the study", "", *summary]))
    the_study.set_user_attr(BEST_NOTED_KEY, best.number)


def note_export(the_study: optuna.Study, trial_number: int, text: str) -> None:
    """Add `text` (on the trial's exported student: files, accuracy, latency) to the trial's note, where it
    stays when the notes are rewritten."""
    the_study.set_user_attr(EXPORTS_KEY, {**the_study.user_attrs.get(EXPORTS_KEY, {}), str(trial_number): text})
    trial = next(t for t in the_study.get_trials(deepcopy=False) if t.number == trial_number)
    _save_finished_trial_note(the_study, trial, _complete_trial_note(the_study, trial))
    note_study(the_study)  # the best trial's note, in case it is this one, gets the study's summary back


def _complete_trial_note(the_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """A completed trial's note, from what the study stored of it."""
    curve = [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
    band = next((b.label for b in front.study_bands(the_study) if b.index == bands.of_trial(trial)), None)
    note = trial_note(trial.number, StudentConfig.from_trial(trial),
                      n_parameters=trial.user_attrs.get("n_parameters", 0), n_epochs=len(curve),
                      seconds=trial.user_attrs.get("seconds", 0.0), val_curve=curve, costs=trial.user_attrs, band=band,
                      outcome=f"complete, best validation accuracy {100 * trial.value:.2f}%")
    exported = the_study.user_attrs.get(EXPORTS_KEY, {}).get(str(trial.number))
    return note if exported is None else f"{note}\n\n#### Exported\n\n{exported}"


def _save_finished_trial_note(the_study: optuna.Study, trial: optuna.trial.FrozenTrial, body: str) -> None:
    # save_note takes a live Trial; the note itself is a study attribute, which a finished trial allows
    optuna_dashboard.save_note(live_trial(the_study, trial), body)
