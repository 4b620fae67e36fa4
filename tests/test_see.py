"""Seeing the study: the report's pictures, the self-contained report.html and `kdtune dashboard`, the last
two checked in a real browser (Playwright driving Debian's chromium)."""

import os
import re
import shutil
import subprocess
import sys

import matplotlib.image
import optuna
import optuna_dashboard
import pytest
from conftest import REPO, run_cli
from optuna.trial import TrialState

from kdtune import bands, dashboard, figures, report
from kdtune.optuna_compat import live_trial
from kdtune.spec import load_spec

PICTURES = ("optimization-history", "parameter-importances", "temperature-lambda-contour", "search-front",
            "front-by-parameters", "front-by-latency", "learning-curves")


@pytest.fixture(scope="module")
def reported(tiny_study):
    """The session's tiny study, tuned and reported (conftest): (working folder, spec path)."""
    workdir, spec, _ = tiny_study
    return workdir, spec


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if sync_playwright is None or chromium is None:
        if os.environ.get("KDTUNE_REQUIRE_BROWSER"):
            pytest.fail("KDTUNE_REQUIRE_BROWSER is set but Playwright or chromium is missing")
        pytest.skip("needs Playwright (pip install playwright) and chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright's own browser download cannot reach the internet here: drive the system's chromium
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_report_draws_every_picture_and_links_it(reported):
    workdir, _ = reported
    folder = workdir / "studies" / "tiny"
    markdown = (folder / "report.md").read_text()
    for name in PICTURES:
        pixels = matplotlib.image.imread(folder / "figures" / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.01, name  # decodes, not blank
        assert f"(figures/{name}.png)" in markdown
    assert "[report.html](report.html)" in markdown


def test_without_the_plotting_libraries_report_says_how_to_get_them(reported, tmp_path, monkeypatch):
    workdir, spec_path = reported
    shutil.copytree(workdir / "studies/tiny", tmp_path / "studies/tiny", ignore=shutil.ignore_patterns("report-runs"))
    monkeypatch.chdir(tmp_path)  # a copy: the shared study keeps its pictures
    spec = load_spec(spec_path)
    monkeypatch.setattr(figures, "missing_libraries", lambda: ["plotly"])
    written = report.write(report.read(spec), spec, optuna.load_study(study_name="tiny", storage=spec.storage_url))
    assert [path.name for path in written] == ["report.md", "report.json"]
    assert 'pip install "kdtune[plots]"' in (tmp_path / "studies/tiny/report.md").read_text()


def test_figures_only_redraws_the_pictures_without_training(reported, tmp_path):
    workdir, spec_path = reported
    shutil.copytree(workdir / "studies/tiny", tmp_path / "studies/tiny", ignore=shutil.ignore_patterns(
        "report-runs", "figures", "report.html"))  # nothing to resume from: a retrain would show
    redrawn = run_cli("report", "--spec", str(spec_path), "--figures-only", cwd=tmp_path)
    assert redrawn.returncode == 0, redrawn.stderr
    assert "Retraining" not in redrawn.stdout and not (tmp_path / "studies/tiny/report-runs").exists()
    assert sorted(p.stem for p in (tmp_path / "studies/tiny/figures").glob("*.png")) == sorted(PICTURES)
    assert (tmp_path / "studies/tiny/report.html").exists()


def test_report_html_is_one_file_that_shows_tables_and_figures_offline(reported, browser, tmp_path):
    workdir, _ = reported
    page_file = workdir / "studies/tiny/report.html"
    text = page_file.read_text()
    assert not re.search(r"<script[^>]+src=", text), "the page loads a script from elsewhere"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.route(re.compile(r"^https?://"), lambda route: route.abort())  # offline: any request would fail
    page.goto(page_file.as_uri())
    page.wait_for_selector(".plotly svg.main-svg")
    assert page.get_by_text("Test set (read only here").first.is_visible()
    assert page.get_by_text("Verdict.").first.is_visible()
    assert page.locator(".plotly").count() == len(PICTURES)
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    page.close()


def test_dashboard_shows_the_study_its_trials_and_the_best_trials_note(reported, browser, tmp_path):
    workdir, spec = reported
    the_study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/studies/tiny/study.db")
    n_trials, best = len(the_study.trials), the_study.best_trial.number
    server = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "dashboard", "--spec", str(spec), "--port", "0"],
                              cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/dashboard/", server.stdout.readline()).group(0)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("Direction: MAXIMIZE").first.wait_for()  # the study list has loaded
        assert re.search(r"\btiny\b", page.inner_text("body"))
        page.screenshot(path=tmp_path / "dashboard-home.png")
        page.goto(f"{url}studies/1/trials?numbers={best}")
        page.get_by_text(f"{n_trials} Trials").first.wait_for()
        page.get_by_text(f"Trial {best}: temperature").first.wait_for()  # the best trial's note
        assert page.get_by_text("The best trial of the study").first.is_visible()
        assert page.get_by_text("Teacher validation accuracy").first.is_visible()
        page.screenshot(path=tmp_path / "dashboard-best-trial.png", full_page=True)
        page.goto(f"{url}studies/1/note")
        page.get_by_text("Best so far").first.wait_for()
        assert page.get_by_text("Verdict.").first.is_visible()  # the report's test table reached the study's note
        page.screenshot(path=tmp_path / "dashboard-study-note.png", full_page=True)
        page.close()
        port = url.split(":")[2].split("/")[0]
        taken = run_cli("dashboard", "--spec", str(spec), "--port", port, cwd=workdir)
        assert taken.returncode == 2 and f"cannot serve the dashboard on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dashboard_warns_when_reachable_from_other_machines():
    assert dashboard.is_loopback("127.0.0.1") and dashboard.is_loopback("localhost") and dashboard.is_loopback("::1")
    assert not dashboard.is_loopback("0.0.0.0") and not dashboard.is_loopback("my-workstation")


def test_only_the_best_trial_s_note_carries_the_study_summary():
    the_study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    the_study.set_user_attr("teacher_val_accuracy", 0.9)
    distributions = {"temperature": optuna.distributions.FloatDistribution(1, 20),
                     "lambda": optuna.distributions.FloatDistribution(0, 1),
                     "width": optuna.distributions.IntDistribution(8, 64)}

    def add(value: float) -> optuna.Trial:
        the_study.add_trial(optuna.trial.create_trial(
            params={"temperature": 2.0, "lambda": 0.5, "width": 32}, distributions=distributions, value=value,
            intermediate_values={0: value}, user_attrs={"n_parameters": 25_450, "seconds": 1.5, "loss": "hinton"}))
        dashboard.note_study(the_study)
        return optuna.Trial(the_study, the_study.trials[-1]._trial_id)

    first = add(0.5)
    assert "The best trial of the study" in optuna_dashboard.get_note(first)
    second = add(0.7)
    assert "The best trial of the study" in optuna_dashboard.get_note(second)
    assert "Teacher validation accuracy: 90.00%" in optuna_dashboard.get_note(second)
    assert "The best trial of the study" not in optuna_dashboard.get_note(first)  # its own note again
    assert "outcome: complete, best validation accuracy 50.00%" in optuna_dashboard.get_note(first)
    assert "Best so far** (of 2 finished trials" in optuna_dashboard.get_note(the_study)


def test_the_study_note_shows_the_front_and_each_trial_note_names_its_band(tiny_study):
    workdir, _, _ = tiny_study
    the_study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/studies/tiny/study.db")
    note = optuna_dashboard.get_note(the_study)
    size_bands = bands.recorded(the_study)
    assert len(size_bands) == 3 and "The size front" in note
    assert all(f"| {band.label} |" in note for band in size_bands)  # a row of the front table for each band
    for trial in the_study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        label = size_bands[trial.user_attrs["band"]].label
        assert f"size band: {label}" in optuna_dashboard.get_note(live_trial(the_study, trial))
