"""Train (or take) the teacher once and cache it: weights, float32 logits for train/val/test, and meta.json.

A cache folder is keyed by (data fingerprint, teacher config and source, seed), so any spec that sees the same
data the same way shares it. Every file's sha256 is in meta.json; a cache that does not match is reported
and rebuilt, never used. A teacher given as weights is only evaluated; one given as logits has no network, so
its cache holds no weights (see `kdtune.teacher_sources`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdtune import teacher_sources
from kdtune.data import Splits
from kdtune.hardware import Compute
from kdtune.models import n_parameters
from kdtune.provenance import sha256_file, versions
from kdtune.spec import Spec, SpecError, TeacherSpec
from kdtune.train import FitResult, accuracy_of_logits, every_epoch, fit, predict

CACHE_ROOT = Path("studies/.teacher-cache")
PARTS = ("train", "val", "test")
WEIGHTS_FILE = "weights.pt"
LATER_TEACHER_KEYS = ("lr_schedule", "augment")
# where the teacher comes from enters the key as teacher_sources.identity gives it: files by their contents
SOURCE_KEYS = ("model", "weights", "logits")


class CorruptCache(Exception):
    """A cache folder whose files are missing or do not match their recorded checksums."""


@dataclass(frozen=True)
class CachedTeacher:
    cache_id: str
    folder: Path
    logits: dict[str, torch.Tensor]  # "train" | "val" | "test" -> (N, C) float32
    meta: dict

    @property
    def val_accuracy(self) -> float:
        return self.meta["val_accuracy"]

    @property
    def n_parameters(self) -> int | None:
        """None for a teacher given as logits: its size is unknown."""
        return self.meta["n_parameters"]


def cache_id(spec: Spec, data_fingerprint: str, compute: Compute) -> str:
    """`compute`: the spec's device and precision, resolved for this machine."""
    # Keys added to [teacher] after teachers were cached enter the key only away from their defaults, which train
    # as before: so every teacher cached before them keeps its id.
    teacher = {name: value for name, value in dataclasses.asdict(spec.teacher).items()
               if not (name in LATER_TEACHER_KEYS and value == getattr(TeacherSpec, name)) and name not in SOURCE_KEYS}
    key = {"data": data_fingerprint, "teacher": teacher, "seed": spec.seed, **teacher_sources.identity(spec.teacher)}
    if compute.autocast_dtype is not None:  # only then: every fp32 teacher cached before precision existed stays valid
        key["precision"] = compute.precision
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(spec: Spec, data_fingerprint: str, compute: Compute) -> Path:
    return CACHE_ROOT / cache_id(spec, data_fingerprint, compute)


def load_or_train(spec: Spec, splits: Splits, compute: Compute, *, force: bool = False,
                  echo: Callable[[str], None] = print) -> CachedTeacher:
    folder = cache_folder(spec, splits.fingerprint, compute)
    if folder.exists() and not force:
        try:
            cached = load(folder)
            if cached.meta["data_fingerprint"] != splits.fingerprint:  # a cache of older kdtune filled wrongly
                raise CorruptCache("it was trained on other data")
            return cached
        except CorruptCache as problem:
            echo(f"teacher cache {folder} is corrupt ({problem}); retraining it.")
    return train(spec, splits, folder, compute, echo=echo)


def load(folder: Path) -> CachedTeacher:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        checksums = meta["sha256"]
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCache(f"meta.json unreadable: {error}") from error
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            raise CorruptCache(f"{name} is missing or does not match its checksum")
    logits = {part: torch.from_numpy(np.load(folder / f"logits_{part}.npy")) for part in PARTS}
    return CachedTeacher(folder.name, folder, logits, meta)


def load_model(cached: CachedTeacher) -> torch.nn.Module:
    """The cached teacher network (weights read with weights_only=True: no pickled code runs)."""
    if WEIGHTS_FILE not in cached.meta["sha256"]:
        raise SpecError(f"teacher {cached.cache_id} was given as logits: there is no network to load.")
    # caches written before colour images record the (H, W) of grey images
    input_shape = cached.meta.get("input_shape") or [1, *cached.meta["image_shape"]]
    source = TeacherSpec(**cached.meta["teacher"])
    model = teacher_sources.network(source, tuple(input_shape), cached.meta["n_classes"])
    return teacher_sources.load_weights(model, cached.folder / WEIGHTS_FILE, key=f"teacher cache {cached.cache_id}")


def train(spec: Spec, splits: Splits, folder: Path, compute: Compute, *,
          echo: Callable[[str], None] = print) -> CachedTeacher:
    """Train the teacher, or evaluate the one the spec gives (weights or logits), and cache it in `folder`."""
    source = spec.teacher
    model, result = None, None  # no network: a logits file; no result: a teacher not trained here
    if source.logits:
        logits = teacher_sources.read_logits(source.logits, splits)  # first: a refused file is not "cached"
        echo(f"Read the teacher's logits from {source.logits}; they are cached in {folder}.")
    else:
        torch.manual_seed(spec.seed)
        model = teacher_sources.network(source, splits.input_shape, splits.n_classes)
        if source.weights:
            echo(f"Evaluating the teacher with the weights in {source.weights} (not trained here).")
            model = teacher_sources.load_weights(model, source.weights).to(compute.device)
        else:
            model, result = _trained(model, spec, splits, compute, echo, folder)
        logits = {part: predict(model, getattr(splits, f"x_{part}").to(compute.device), compute.autocast_dtype).cpu()
                  for part in PARTS}
    result = result or FitResult(accuracy_of_logits(logits["val"], splits.y_val), 0, 0.0)

    # write everything to a scratch folder, then rename: a crash never leaves a half-written cache
    scratch = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    scratch.mkdir(parents=True, exist_ok=True)
    files = [f"logits_{part}.npy" for part in PARTS]
    if model is not None:
        torch.save(model.state_dict(), scratch / WEIGHTS_FILE)
        files.insert(0, WEIGHTS_FILE)
    for part, values in logits.items():
        np.save(scratch / f"logits_{part}.npy", values.numpy())
    meta = {
        "val_accuracy": result.val_accuracy, "n_epochs": result.n_epochs, "seconds": round(result.seconds, 2),
        "val_curve": result.val_curve, "n_parameters": None if model is None else n_parameters(model),
        "input_shape": list(splits.input_shape),
        "n_classes": splits.n_classes, "data_fingerprint": splits.fingerprint, "seed": spec.seed,
        "teacher": dataclasses.asdict(spec.teacher), "device": str(compute.device), "precision": compute.precision,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": {f: sha256_file(scratch / f) for f in files},
    }
    (scratch / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    echo(f"Teacher: validation accuracy {result.val_accuracy:.4f}" + (
        f" after {result.n_epochs} epochs ({result.seconds:.0f} s)." if result.n_epochs else " (not trained here)."))
    return CachedTeacher(folder.name, folder, logits, meta)


def _trained(model: torch.nn.Module, spec: Spec, splits: Splits, compute: Compute, echo: Callable[[str], None],
             folder: Path) -> tuple[torch.nn.Module, FitResult]:
    device = compute.device
    echo(f"Training the teacher on {len(splits.x_train)} samples ({device}, {compute.precision}); it is cached in "
         f"{folder}.")
    x_train, y_train = splits.x_train.to(device), splits.y_train.to(device)
    x_val, y_val = splits.x_val.to(device), splits.y_val.to(device)
    with tqdm(total=spec.teacher.max_epochs, desc="teacher", unit="epoch") as bar:
        def show(epoch: int, val_accuracy: float) -> None:
            bar.set_postfix(val_accuracy=f"{val_accuracy:.4f}")
            bar.update()

        result = fit(model, x_train, y_train, x_val, y_val, schedule=spec.teacher, seed=spec.seed,
                     loss_fn=every_epoch(lambda logits, _, labels: F.cross_entropy(logits, labels)), report=show,
                     autocast_dtype=compute.autocast_dtype, lr_schedule=spec.teacher.lr_schedule,
                     augment=spec.teacher.augment)
    return model, result

