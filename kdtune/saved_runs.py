"""The students `report` trains, kept on disk: a report stopped after an hour of retraining (Ctrl-C, a lost
session) resumes where it stopped instead of starting over.

A run is keyed by everything that decides its weights: configuration, seed, student schedule, transfer set,
data, teacher and precision. Change any of them and the run is trained afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdtune.train import FitResult

Run = tuple[nn.Module, FitResult]


# what reading a run that is cut short, from an older layout or not a run at all raises
READ_ERRORS = (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError)


def load(path: Path, build: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module, dict]:
    """The model a saved run holds, built by `build()` on `device`, and the saved record (weights, fit)."""
    saved = torch.load(path, map_location=device, weights_only=True)
    model = build().to(device)
    model.load_state_dict(saved["state_dict"])
    return model, saved


def path_of(folder: Path, context: dict, params: dict, seed: int) -> Path:
    """The file that holds (or will hold) the run of `params` with `seed` in `context`."""
    key = hashlib.sha256(json.dumps({**context, "params": params, "seed": seed}, sort_keys=True).encode())
    return folder / f"{key.hexdigest()[:20]}.pt"


def trained(folder: Path, context: dict, params: dict, seed: int, device: torch.device,
            build: Callable[[], nn.Module], train: Callable[[], Run]) -> tuple[Run, bool]:
    """The run for `params` and `seed`, from `folder` when an earlier report finished it, else from `train()`
    (and then saved). Returns the run and whether it came from disk."""
    path = path_of(folder, context, params, seed)
    if path.exists():
        try:
            model, saved = load(path, build, device)
            return (model, FitResult(**saved["fit"])), True
        except READ_ERRORS:
            pass  # a run cut off while saving, or from an older layout: train it again
    model, result = train()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"state_dict": model.state_dict(), "fit": dataclasses.asdict(result)}, partial)
    os.replace(partial, path)  # atomic: a run on disk is always whole
    return (model, result), False
