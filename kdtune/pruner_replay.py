"""Is the pruner fair to slow starters? Each band winner's search curve replayed against its band.

Distilled students can start slower than their twins and overtake them late; a pruner that judges early epochs
would then kill exactly the students a study is for. The check: replay the winner's recorded validation curve,
epoch by epoch, through the study's own pruner, as if the winner had run last, after every other completed
trial of its band. A winner the replay stops is one that a later position in the study would have lost.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from kdtune import bands
from kdtune.spec import Spec
from kdtune.study import make_pruner


def pruned_at_epoch(spec: Spec, winner: FrozenTrial, band_trials: list[FrozenTrial]) -> int | None:
    """The epoch (from 1) after which the spec's pruner would stop `winner` had it run after every other
    trial of `band_trials` (its band's finished trials, pruned ones included), or None if it would let it
    finish. Under hyperband the replay is only indicative: its brackets follow the study's name and trial
    numbers, which the replay does not keep."""
    replay = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    replay.add_trials([t for t in band_trials if t.number != winner.number])
    trial = replay.ask()
    trial.set_user_attr(bands.TRIAL_KEY, bands.of_trial(winner))  # the per-band pruner judges it in its band
    for epoch, value in sorted(winner.intermediate_values.items()):
        trial.report(value, epoch)
        if trial.should_prune():
            return epoch + 1
    return None


def summary(bands_found: list[dict], pruner: str) -> str:
    """One sentence on the replays of the report's band winners (`pruned_at_epoch` in each band's entry)."""
    replayed = [b for b in bands_found if "pruned_at_epoch" in b]
    stopped = [b for b in replayed if b["pruned_at_epoch"] is not None]
    if not replayed:
        return "No band winner has a recorded search curve to replay through the pruner."
    where = "; ".join(f"{b['band_label']}: trial {b['winner_trial']} after epoch {b['pruned_at_epoch']}"
                      for b in stopped)
    return (f"Replayed through the {pruner} pruner against the other finished trials of its band, as if it had "
            f"run last, {len(stopped)} of {len(replayed)} band winners would have been stopped"
            + (f" ({where}): the pruner can kill slow starters here; consider more n_warmup_epochs or "
               "n_startup_trials." if stopped else ": the pruner let every winner finish."))
