"""The report's pictures: static PNG (matplotlib) linked from report.md, and interactive plotly figures in
report.html, one self-contained file that opens offline (plotly.js is embedded once, no CDN).

Optional: `pip install "kdtune[plots]"`. Optuna's own plots (history, importances, contour) come from
`optuna.visualization` and its matplotlib twin; kdtune's own (the size front as the search saw it and on the
test set, learning curves) are described once as a `Chart` and drawn by both libraries.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import re
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from kdtune import front
from kdtune.student import StudentConfig

INSTALL_HINT = 'pip install "kdtune[plots]"'


def missing_libraries() -> list[str]:
    return [name for name in ("plotly", "matplotlib") if importlib.util.find_spec(name) is None]


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    x: list[float]
    y: list[float]
    lines: bool  # False: markers only


@dataclasses.dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    levels: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # labelled horizontal lines
    x_log: bool = False


def search_front(study: optuna.Study, teacher_val_accuracy: float | None) -> Chart:
    """Every completed trial's validation accuracy against its parameter count, distilled and not, and the
    best trial of each size band: the front as the search sees it (one seed each)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distilled = [t for t in complete if StudentConfig.from_trial(t).distils]
    alone = [t for t in complete if not StudentConfig.from_trial(t).distils]
    entries = front.best_per_band(study)

    def params(trials):
        return [t.user_attrs.get("n_parameters", 0) for t in trials]

    return Chart(
        title="The size front: validation accuracy by student parameters", x_label="student parameters",
        y_label="validation accuracy", x_log=True,
        series=[Series("distilled trials", params(distilled), [t.value for t in distilled], lines=False),
                Series("no distillation (lambda = 1)", params(alone), [t.value for t in alone], lines=False),
                Series("best trial of each size band", [e["n_parameters"] for e in entries],
                       [e["val_accuracy"] for e in entries], lines=True)],
        levels=[] if teacher_val_accuracy is None else [("teacher", teacher_val_accuracy)])


def test_front(report: dict, by: str) -> Chart | None:
    """Each size band's winner and its twin on the test set (mean over the report's seeds) against parameters
    (`by` = "parameters") or batch-1 latency ("latency"), the teacher as a level; None for reports before bands."""
    if "front" not in report:
        return None
    front_bands = report["front"]
    x = ([b["rows"]["tuned"]["n_parameters"] for b in front_bands] if by == "parameters"
         else [b["latency"]["latency_ms_batch1"] for b in front_bands])
    return Chart(
        title=f"The size front on the test set, by {by}",
        x_label="student parameters" if by == "parameters" else "CPU latency at batch 1 (ms, median)",
        y_label="test accuracy (mean over seeds)", x_log=True,
        series=[Series("tuned winner of each band", x, [b["rows"]["tuned"]["test_mean"] for b in front_bands],
                       lines=True),
                Series("same student, no distillation", x,
                       [b["rows"]["no_distillation"]["test_mean"] for b in front_bands], lines=True)],
        levels=[("teacher", report["teacher"]["test_accuracy"])])


def learning_curves(report: dict) -> Chart | None:
    """The winner and its no-distillation twin, validation accuracy per epoch, mean over the report's seeds
    (up to the epoch every seed reached: early stopping ends seeds at different epochs)."""
    series = []
    for name, label in (("tuned", "tuned winner"), ("no_distillation", "same student, no distillation")):
        curves = report["rows"][name].get("val_curves")
        if not curves:  # a report.json written before curves were recorded
            return None
        n_epochs = min(len(c) for c in curves)
        mean = [sum(c[e] for c in curves) / len(curves) for e in range(n_epochs)]
        series.append(Series(f"{label} ({len(curves)} seeds)", list(range(1, n_epochs + 1)), mean, lines=True))
    return Chart(title="Learning curves: the winner with and without distillation", x_label="epoch",
                 y_label="validation accuracy", series=series)


def chart_to_plotly(chart: Chart):
    import plotly.graph_objects as go
    figure = go.Figure()
    for s in chart.series:
        figure.add_trace(go.Scatter(x=s.x, y=s.y, name=s.name, mode="lines" if s.lines else "markers"))
    for name, level in chart.levels:
        figure.add_hline(y=level, line_dash="dash", annotation_text=name)
    figure.update_layout(title=chart.title, xaxis_title=chart.x_label, yaxis_title=chart.y_label)
    if chart.x_log:
        figure.update_xaxes(type="log")
    return figure


def chart_to_matplotlib(chart: Chart):
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5))
    for s in chart.series:
        axes.plot(s.x, s.y, "-" if s.lines else "o", label=s.name, markersize=4)
    for name, level in chart.levels:
        axes.axhline(level, linestyle="--", color="grey", linewidth=1)
        axes.annotate(name, (0.01, level), xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    axes.set(title=chart.title, xlabel=chart.x_label, ylabel=chart.y_label)
    if chart.x_log:
        axes.set_xscale("log")
    axes.legend(fontsize=8)
    return figure


def figure_makers(study: optuna.Study, report: dict) -> dict[str, tuple[Callable, Callable]]:
    """{file stem: (plotly figure maker, matplotlib figure maker)}, in the order report.md shows them."""
    from optuna import visualization as plotly_plots
    from optuna.visualization import matplotlib as matplotlib_plots

    def optuna_plot(name: str, **kwargs) -> tuple[Callable, Callable]:
        return (lambda: getattr(plotly_plots, name)(study, **kwargs),
                lambda: _figure_of(getattr(matplotlib_plots, name)(study, **kwargs)))

    makers = {"optimization-history": optuna_plot("plot_optimization_history"),
              "parameter-importances": optuna_plot("plot_param_importances")}
    # Hinton's params: a study of other loss forms only may have no trial that holds them
    if any({"temperature", "lambda"} <= set(t.params) for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))):
        makers["temperature-lambda-contour"] = optuna_plot("plot_contour", params=["temperature", "lambda"])
    charts = {"search-front": search_front(study, report["teacher"]["val_accuracy"]),
              "front-by-parameters": test_front(report, "parameters"),
              "front-by-latency": test_front(report, "latency"), "learning-curves": learning_curves(report)}
    for stem, chart in charts.items():
        if chart is not None:
            makers[stem] = (lambda c=chart: chart_to_plotly(c), lambda c=chart: chart_to_matplotlib(c))
    return makers


def _figure_of(axes):
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.get_figure()


def write(study: optuna.Study, report: dict, markdown: str, folder: Path) -> tuple[list[Path], Path]:
    """Write figures/<name>.png and the self-contained report.html into `folder`; return the PNG paths
    and the HTML path."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    (folder / "figures").mkdir(parents=True, exist_ok=True)
    pngs, interactive = [], []
    for stem, (make_plotly, make_matplotlib) in figure_makers(study, report).items():
        figure = make_matplotlib()
        figure.tight_layout()
        figure.savefig(folder / "figures" / f"{stem}.png", dpi=100)
        plt.close(figure)
        pngs.append(folder / "figures" / f"{stem}.png")
        interactive.append(make_plotly())
    html_path = folder / "report.html"
    html_path.write_text(html_page(report["study"], markdown, interactive))
    return pngs, html_path


def html_page(title: str, markdown: str, figures: list) -> str:
    """One HTML file: the report's markdown (its own small subset) and the figures, plotly.js inline once."""
    plots = [figure.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, figure in enumerate(figures)]
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>\n"
            + markdown_to_html(markdown) + "\n" + "\n".join(plots) + "\n</body></html>\n")


def markdown_to_html(markdown: str) -> str:
    """The subset report.md uses: headings, tables, paragraphs, **bold**, `code`; images are left out (the
    HTML shows the interactive figures instead)."""
    blocks = []
    for block in markdown.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0].startswith("!["):
            continue
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            blocks.append(f"<h{level}>{_inline(lines[0][level:].strip())}</h{level}>")
        elif lines[0].startswith("|"):
            rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if "---" not in line]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
            blocks.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            blocks.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(blocks)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
