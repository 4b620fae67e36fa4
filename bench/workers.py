"""Many workers, one study: storage cost per trial on each storage, and trials per hour with 1 and 2 workers.

    python bench/workers.py [--quick] [--jobs 1,2]

Storage: the storage calls of one kdtune trial (3 params, 7 attributes, 10 epoch reports with a pruning
check each) timed on kdtune's SQLite, Optuna's journal file and PostgreSQL, each as `tune --jobs` opens it
(with heartbeats where the storage has them). PostgreSQL is a throwaway local server (tests/postgres.py:
Debian's `postgresql` package); without it that row says so.

Trials per hour: `kdtune tune --jobs N` itself, as a user runs it, on the embedded data with every trial the
same size (width 512, no pruner, a fixed number of epochs), so that 1 and 2 workers do equal work per trial
and the ratio is the parallel speed-up alone. Counted from the first trial's start to the last trial's end,
as recorded in the study; the process start-up and data loading are the `wall_seconds` beside it.
Writes bench/results/workers-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from kdtune import hardware, target
from kdtune.provenance import versions
from kdtune.spec import load_spec
from kdtune.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import postgres  # noqa: E402
from storages import ms_per_trial  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Every trial the same: width 512, no pruning, no early stop. Teacher section and seed as the quickstart,
# so its cached teacher serves.
EQUAL_TRIALS_SPEC = """
seed = 0
device = "cpu"
artifacts = "{artifacts}"
[data]
format = "embedded"
[student]
max_epochs = {epochs}
patience_epochs = {epochs}
batch_size = 256
[search]
width = 512
pruner = "none"
"""


def storage_costs(folder: Path, server: postgres.Server | None, n_trials: int) -> dict:
    spec = load_spec()
    storages = {"sqlite_kdtune": lambda: open_storage(f"sqlite:///{folder}/kdtune.db", spec.workers),
                "journal_file": lambda: optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(folder / "journal.log")))}
    if server is not None:
        storages["postgresql"] = lambda: open_storage(server.url, spec.workers)
    costs = {name: ms_per_trial(storage(), spec, n_trials) for name, storage in storages.items()}
    if server is None:
        costs["postgresql"] = "not installed (apt-get install postgresql)"
    return costs


def trials_per_hour(folder: Path, storage: str, url: str, n_jobs: int, n_trials: int, n_epochs: int) -> dict:
    name = f"{storage}-{n_jobs}-workers"
    spec_path = folder / f"{name}.toml"
    spec_path.write_text(EQUAL_TRIALS_SPEC.format(artifacts=folder / name, epochs=n_epochs))
    command = [sys.executable, str(REPO / "cli.py"), "tune", "--spec", str(spec_path), "--storage", url,
               "--trials", str(n_trials), "--jobs", str(n_jobs)]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    wall_seconds = time.perf_counter() - started
    trials = optuna.load_study(study_name=name, storage=url).get_trials(states=target.FINISHED)
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    seconds = (last - first).total_seconds()
    return {"jobs": n_jobs, "n_trials": len(trials), "epochs_per_trial": n_epochs, "seconds": round(seconds, 1),
            "wall_seconds": round(wall_seconds, 1), "trials_per_hour": round(3600 * len(trials) / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few trials of few epochs")
    parser.add_argument("--jobs", default="1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/workers-<machine>-<date>.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_trials, n_epochs = (6, 2) if args.quick else (40, 10)
    # the teacher is trained (or found) once, outside every timing
    subprocess.run([sys.executable, str(REPO / "cli.py"), "teacher"], cwd=REPO, check=True, capture_output=True)

    binaries = postgres.server_binaries()
    server = postgres.Server(binaries) if binaries is not None else None
    results = {"quick": args.quick, "versions": versions(), "cpu_flags": hardware.reported_cpu_flags(),
               "available_cpus": hardware.available_cpus(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join(sys.argv)}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            results["storage_ms_per_trial"] = storage_costs(folder, server, n_trials=10 if args.quick else 50)
            urls = {"sqlite": f"sqlite:///{folder}/tune.db"} | ({"postgresql": server.url} if server else {})
            results["trials_per_hour"] = {
                storage: [trials_per_hour(folder, storage, url, int(n_jobs), n_trials, n_epochs)
                          for n_jobs in args.jobs.split(",")]
                for storage, url in urls.items()}
    finally:
        if server is not None:
            server.remove()
    results["seconds"] = round(time.perf_counter() - started, 1)

    print(f"CPU flags: {' '.join(results['cpu_flags'])}; CPUs available: {results['available_cpus']}")
    print("\n## storage per trial (ms)")
    for name, value in results["storage_ms_per_trial"].items():
        print(f"{name:<16}{value:>10.1f}" if isinstance(value, float) else f"{name:<16}{value:>10}")
    print("\n## trials per hour, every trial width 512 for the same epochs")
    for storage, rows in results["trials_per_hour"].items():
        base = rows[0]["trials_per_hour"]
        for row in rows:
            print(f"{storage:<12} jobs={row['jobs']}  {row['n_trials']} trials in {row['seconds']} s "
                  f"(wall {row['wall_seconds']} s): {row['trials_per_hour']} trials/h, "
                  f"{row['trials_per_hour'] / base:.2f}x")
    out = args.out or REPO / "bench/results" / f"workers-{platform.node() or 'machine'}-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{results['seconds']:.0f} s; written {out}")


if __name__ == "__main__":
    main()
