"""The dataset a spec names, relabelled, validated and oriented; the train/val split and its fingerprint.

`load` returns a `Dataset` of uint8 images (N, H, W) and int64 labels 0..C-1 (the file formats are read in
`kdtune.readers`). The validation split is carved from the training images (stratified, seeded) and is what
the teacher's early stopping and the whole Optuna search look at; the test images are only read by `report`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtune.models import TEACHER_MIN_SIDE
from kdtune.readers import READERS, DataError, Dataset
from kdtune.spec import DataSpec


@dataclass(frozen=True)
class Splits:
    """Float tensors (N, 1, H, W) in [0, 1] and int64 labels; `fingerprint` names the data and the split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    fingerprint: str

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[-2:])


def load(spec: DataSpec) -> Dataset:
    """Read, relabel, validate and orient the dataset a spec names."""
    raw = READERS[spec.format](Path(spec.path) if spec.path else None)
    where = spec.path or spec.format
    y_train, y_test = (_whole_labels(y, where, name) - spec.label_offset
                       for y, name in ((raw.y_train, "y_train"), (raw.y_test, "y_test")))
    validate(Dataset(raw.x_train, y_train, raw.x_test, y_test), spec)
    # after validation, which has checked that the images are (N, H, W)
    x_train, x_test = (np.ascontiguousarray(x.transpose(0, 2, 1)) if spec.transpose else x
                       for x in (raw.x_train, raw.x_test))
    return Dataset(x_train, y_train, x_test, y_test)


def validate(dataset: Dataset, spec: DataSpec) -> None:
    where = spec.path or spec.format
    for name in ("x_train", "x_test"):
        x = getattr(dataset, name)
        if x.ndim != 3 or x.shape[0] == 0:
            raise DataError(f"{where}: {name} must be a non-empty (N, H, W) image array, but got shape {x.shape}.")
        if x.dtype != np.uint8:
            raise DataError(f"{where}: {name} must be uint8 pixels 0..255, but got dtype {x.dtype}.")
    if dataset.x_train.shape[1:] != dataset.x_test.shape[1:]:
        raise DataError(f"{where}: train images are {dataset.x_train.shape[1:]} but test images are "
                        f"{dataset.x_test.shape[1:]}.")
    height, width = dataset.x_train.shape[1:]
    if min(height, width) < TEACHER_MIN_SIDE:
        side = f"{TEACHER_MIN_SIDE}x{TEACHER_MIN_SIDE}"
        raise DataError(f"{where}: images are {height}x{width} pixels, but the teacher CNN needs at least {side}; "
                        f"pad or resize the images to at least {side}.")
    for x_name, y_name in (("x_train", "y_train"), ("x_test", "y_test")):
        n_images, n_labels = len(getattr(dataset, x_name)), len(getattr(dataset, y_name))
        if n_images != n_labels:
            raise DataError(f"{where}: {n_images} images in {x_name} but {n_labels} labels in {y_name}.")
    low = min(dataset.y_train.min(), dataset.y_test.min())
    if low < 0:
        raise DataError(f"{where}: labels go below 0 after data.label_offset = {spec.label_offset}; "
                        "lower label_offset.")
    # np.unique, not np.bincount: one stray label of 10**12 must not allocate an array of that length
    classes, counts = np.unique(dataset.y_train, return_counts=True)
    gaps = np.flatnonzero(classes != np.arange(len(classes)))
    if gaps.size:
        hint = " Labels may start at 1: set data.label_offset = 1." if gaps[0] == 0 else ""
        raise DataError(f"{where}: no training image has label {gaps[0]}, but labels must run 0..C-1 and the "
                        f"largest is {classes[-1]}.{hint}")
    if len(classes) < 2:
        raise DataError(f"{where}: every training image has label {classes[0]}; a classifier needs at least 2 "
                        "classes.")
    if counts.min() < 2:
        rare = classes[np.argmin(counts)]
        raise DataError(f"{where}: class {rare} has only 1 training image; every class needs at least 2, one for "
                        "training and one for the validation split.")
    if dataset.y_test.max() >= dataset.n_classes:
        raise DataError(f"{where}: test label {dataset.y_test.max()} never occurs in the training labels.")


# ------------------------------------------------------------------------------------- split, tensors

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) taking round(val_fraction * n_c) images of every class c, at least one each."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val_parts.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def fingerprint(dataset: Dataset, train_idx: np.ndarray, val_idx: np.ndarray) -> str:
    """sha256 over every array and the split: equal fingerprints mean identical data seen identically."""
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test, train_idx, val_idx):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.tensor copies: the IDX reader's arrays are read-only views of the file, which from_numpy would share
    return model_inputs(torch.tensor(images)), torch.tensor(labels)


def model_inputs(pixels: torch.Tensor) -> torch.Tensor:
    """What every model here takes: uint8 pixels (N, H, W) as float32 in [0, 1], shaped (N, 1, H, W). An
    exported student carries this step in its graph (kdtune.runtime), so it takes the uint8 pixels as they are."""
    return pixels.to(torch.float32).div(255.0).unsqueeze(1)


def pixels(inputs: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels (N, H, W) back from `model_inputs`: exact, each input being a whole number over 255."""
    return inputs.squeeze(1).mul(255.0).round().to(torch.uint8)


def prepare(spec: DataSpec, seed: int) -> Splits:
    dataset = load(spec)
    train_idx, val_idx = stratified_split(dataset.y_train, spec.val_fraction, seed)
    x_train, y_train = to_tensors(dataset.x_train[train_idx], dataset.y_train[train_idx])
    x_val, y_val = to_tensors(dataset.x_train[val_idx], dataset.y_train[val_idx])
    x_test, y_test = to_tensors(dataset.x_test, dataset.y_test)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, dataset.n_classes,
                  fingerprint(dataset, train_idx, val_idx))


# ------------------------------------------------------------------------------------------- helpers

def _whole_labels(labels: np.ndarray, where: str, name: str) -> np.ndarray:
    """int64 labels; float labels are fine when whole (3.0 from a CSV or .mat), but never truncated."""
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.floor(labels))]
        if bad.size:
            raise DataError(f"{where}: {name} must hold whole-number labels, but holds {bad[0]}; fix those labels "
                            "or drop their images.")
    elif labels.dtype.kind not in "biu":
        raise DataError(f"{where}: {name} must hold integer labels, but got dtype {labels.dtype}.")
    return labels.astype(np.int64)
