"""Screenshots of a study in the dashboard and of its report.html, as the README shows them.

    python docs/screenshots.py [--spec studies/quickstart.toml] [--out docs/images]

Needs the study tuned and reported, Playwright (`pip install playwright`, in kdtune[dev]) and a chromium
(`apt-get install chromium`; Playwright drives the system's, never downloads its own).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
from playwright.sync_api import sync_playwright

from kdtune.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, help="study spec (default: the quickstart)")
    parser.add_argument("--out", type=Path, default=REPO / "docs/images")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    best = optuna.load_study(study_name=spec.name, storage=spec.storage_url).best_trial.number
    args.out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "cli.py"), "dashboard", "--port", "0"] + (["--spec", str(args.spec)]
                                                                                    if args.spec else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/dashboard/", server.stdout.readline()).group(0)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            shots = {"dashboard-history.png": ("studies/1", "Hyperparameter Importance"),
                     "dashboard-best-trial.png": (f"studies/1/trials?numbers={best}", f"Trial {best}: temperature"),
                     "dashboard-study-note.png": ("studies/1/note", "Best so far")}
            for name, (path, text) in shots.items():
                page.goto(url + path)
                page.get_by_text(text).first.wait_for()
                page.wait_for_timeout(1000)  # let the charts finish drawing
                page.screenshot(path=args.out / name)
                print(args.out / name)
            page.goto((spec.output_dir / "report.html").resolve().as_uri())
            page.wait_for_selector(".plotly svg.main-svg")
            page.screenshot(path=args.out / "report-html.png")
            print(args.out / "report-html.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
