"""The study in optuna-dashboard: serving it, and the notes it shows beside Optuna's own charts.

Every trial carries a note: its configuration, parameter count, epochs, seconds, how it ended and its
validation curve. The study's note holds the best configuration so far and the teacher's accuracy and,
once `report` has run, its test table with the distillation gain and interval. Notes live in the study's
storage (optuna-dashboard keeps them as system attributes), so every worker and every viewer sees them.
"""

from __future__ import annotations

import ipaddress
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard
from optuna.trial import TrialState

from kdtune.artifacts import open_artifact_store
from kdtune.spec import Spec, SpecError
from kdtune.storage import open_storage

REPORT_NOTE_KEY = "report_note"  # study user attribute: the last report's test table and verdict, in markdown


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


def note_trial(trial: optuna.Trial, params: dict, *, n_parameters: int, n_epochs: int, seconds: float,
               val_curve: list[float], outcome: str) -> None:
    curve = ", ".join(f"{100 * value:.2f}" for value in val_curve) or "none (ended before its first epoch)"
    optuna_dashboard.save_note(trial, "\n".join([
        f"### Trial {trial.number}: temperature {params['temperature']:.3g}, lambda {params['lambda']:.3g}, "
        f"width {params['width']}",
        "",
        f"- outcome: {outcome}",
        f"- student parameters: {n_parameters:,}",
        f"- epochs: {n_epochs}, seconds: {seconds:.1f}",
        f"- validation accuracy by epoch (%): {curve}",
    ]))


def note_study(the_study: optuna.Study) -> None:
    """Rewrite the study's note from what the study holds now: best trial, teacher, the last report."""
    finished = the_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    lines = [f"## {the_study.study_name}", ""]
    if complete:
        best = max(complete, key=lambda t: t.value)
        lines.append(f"**Best so far** (of {len(finished)} finished trials, by validation accuracy): trial "
                     f"{best.number}, temperature {best.params['temperature']:.3g}, lambda "
                     f"{best.params['lambda']:.3g}, width {best.params['width']}, "
                     f"{best.user_attrs.get('n_parameters', 0):,} parameters, validation accuracy "
                     f"{100 * best.value:.2f}%.")
    else:
        lines.append(f"No completed trial yet ({len(finished)} finished).")
    teacher_val = the_study.user_attrs.get("teacher_val_accuracy")
    if teacher_val is not None:
        lines += ["", f"Teacher validation accuracy: {100 * teacher_val:.2f}%."]
    lines += ["", the_study.user_attrs.get(REPORT_NOTE_KEY,
                                           "No report yet: `kdtune report` adds the test table here.")]
    optuna_dashboard.save_note(the_study, "\n".join(lines))
