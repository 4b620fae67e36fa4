"""The dataset a spec names, relabelled, validated and oriented; the train/val split and its fingerprint.

`load` returns a `Dataset` of uint8 images, (N, H, W) grey or (N, H, W, C) colour, or of float32 feature vectors
(N, D), with int64 labels 0..C-1 (the file formats are read in `kdtune.readers`). The validation split is carved
from the training images (stratified, seeded) and is what the teacher's early stopping and the whole Optuna
search look at; the test images are only read by `report`.

Models take `model_inputs`: images as float32 (N, C, H, W) in [0, 1], features as they are. A model's
`input_shape` is therefore (C, H, W) or (D,); `raw_shape` is one sample as the user holds it.
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
    """Model inputs (`model_inputs`) and int64 labels; `fingerprint` names the data and the split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    fingerprint: str
    class_names: tuple[str, ...] | None = None
    # the training file's rows that became x_train and x_val: what a teacher's logits file is aligned with
    train_rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input: (C, H, W) for images, (D,) for feature vectors."""
        return tuple(self.x_train.shape[1:])


def load(spec: DataSpec) -> Dataset:
    """Read, relabel, validate and orient the dataset a spec names."""
    raw = READERS[spec.format](Path(spec.path) if spec.path else None)
    where = spec.path or spec.format
    y_train, y_test = (class_numbers(y, where, name) - spec.label_offset
                       for y, name in ((raw.y_train, "y_train"), (raw.y_test, "y_test")))
    if spec.format == "features":
        x_train, x_test = (_features(x, where, name) for x, name in ((raw.x_train, "x_train"), (raw.x_test, "x_test")))
    else:
        x_train, x_test = (_channels_last(x, spec.layout, where, name)
                           for x, name in ((raw.x_train, "x_train"), (raw.x_test, "x_test")))
    validate(Dataset(x_train, y_train, x_test, y_test, raw.class_names), spec)
    if spec.transpose:  # after validation, which has checked that these are images, (N, H, W[, C])
        x_train, x_test = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (x_train, x_test))
    return Dataset(x_train, y_train, x_test, y_test, raw.class_names)


def validate(dataset: Dataset, spec: DataSpec) -> None:
    where = spec.path or spec.format
    for name in ("x_train", "x_test"):
        x = getattr(dataset, name)
        if len(x) == 0:
            raise DataError(f"{where}: {name} holds no {'vectors' if spec.format == 'features' else 'images'}.")
        if spec.format != "features" and x.dtype != np.uint8:
            raise DataError(f"{where}: {name} must be uint8 pixels 0..255, but got dtype {x.dtype}; feature vectors "
                            "are data.format = \"features\".")
    if dataset.x_train.shape[1:] != dataset.x_test.shape[1:]:
        raise DataError(f"{where}: train samples are {dataset.x_train.shape[1:]} but test samples are "
                        f"{dataset.x_test.shape[1:]}.")
    if spec.format != "features" and min(dataset.x_train.shape[1:3]) < TEACHER_MIN_SIDE:
        side, (height, width) = f"{TEACHER_MIN_SIDE}x{TEACHER_MIN_SIDE}", dataset.x_train.shape[1:3]
        raise DataError(f"{where}: images are {height}x{width} pixels, but kdtune's CNNs need at least {side}; "
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
    check_classes(dataset.y_test, dataset.n_classes, where, "test label", "in the training labels",
                  "relabel or drop those test images")
    if dataset.class_names is not None and len(dataset.class_names) != dataset.n_classes:
        raise DataError(f"{where}: {len(dataset.class_names)} class names for {dataset.n_classes} classes.")


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
    if dataset.class_names is not None:  # only then: data without names keeps the fingerprint it always had
        digest.update("\n".join(dataset.class_names).encode())
    return digest.hexdigest()


def to_tensors(samples: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.tensor copies: the IDX reader's arrays are read-only views of the file, which from_numpy would share
    return model_inputs(torch.tensor(samples)).contiguous(), torch.tensor(labels)


def model_inputs(raw: torch.Tensor) -> torch.Tensor:
    """What every model here takes: uint8 pixels (N, H, W) or (N, H, W, C) as float32 in [0, 1], shaped
    (N, C, H, W); float feature vectors (N, D) as float32. An exported student carries this step in its graph
    (kdtune.runtime), so it takes the samples as the user holds them."""
    if raw.dtype != torch.uint8:
        return raw.to(torch.float32)
    scaled = raw.to(torch.float32).div(255.0)
    return scaled.unsqueeze(1) if scaled.ndim == 3 else scaled.permute(0, 3, 1, 2)


def raw_samples(inputs: torch.Tensor) -> torch.Tensor:
    """The samples back from `model_inputs`: exact, each pixel input being a whole number over 255."""
    if inputs.ndim == 2:
        return inputs
    pixels = inputs.mul(255.0).round().to(torch.uint8)
    return pixels.squeeze(1) if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)


def raw_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample as the user holds it, for a model taking `input_shape`: (H, W), (H, W, C) or (D,)."""
    if len(input_shape) == 1:
        return tuple(input_shape)
    channels, height, width = input_shape
    return (height, width) if channels == 1 else (height, width, channels)


def raw_dtype(input_shape: tuple[int, ...]) -> np.dtype:
    return np.dtype(np.uint8 if len(input_shape) == 3 else np.float32)


def prepare(spec: DataSpec, seed: int) -> Splits:
    dataset = load(spec)
    train_idx, val_idx = stratified_split(dataset.y_train, spec.val_fraction, seed)
    x_train, y_train = to_tensors(dataset.x_train[train_idx], dataset.y_train[train_idx])
    x_val, y_val = to_tensors(dataset.x_train[val_idx], dataset.y_train[val_idx])
    x_test, y_test = to_tensors(dataset.x_test, dataset.y_test)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, dataset.n_classes,
                  fingerprint(dataset, train_idx, val_idx), dataset.class_names, train_idx, val_idx)


# ------------------------------------------------------------------------------------------- helpers

def _channels_last(images: np.ndarray, layout: str, where: str, name: str) -> np.ndarray:
    """Images as (N, H, W) grey or (N, H, W, 3) colour, from (N, H, W), (N, H, W, C) or (N, C, H, W)."""
    shape = images.shape
    if images.ndim == 3:
        return images
    if images.ndim != 4:
        raise DataError(f"{where}: {name} must be images (N, H, W), (N, H, W, C) or (N, C, H, W), but got shape "
                        f"{shape}.")
    if layout == "auto":
        last, first = shape[3] in (1, 3), shape[1] in (1, 3)
        if last == first:
            raise DataError(f"{where}: {name} has shape {shape}: " + (
                "which axis holds the channels is ambiguous; set data.layout = \"nhwc\" or \"nchw\"." if last else
                "images need 1 or 3 channels, on the last axis (N, H, W, C) or the second (N, C, H, W)."))
        layout = "nhwc" if last else "nchw"
    if layout == "nchw":
        images = np.moveaxis(images, 1, 3)
    if images.shape[3] not in (1, 3):
        raise DataError(f"{where}: {name} has {images.shape[3]} channels with data.layout = {layout!r}, but images "
                        "need 1 (grey) or 3 (colour).")
    return images[..., 0] if images.shape[3] == 1 else images


def _features(vectors: np.ndarray, where: str, name: str) -> np.ndarray:
    """Feature vectors as float32 (N, D), every value finite."""
    if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
        raise DataError(f"{where}: {name} must be feature vectors, a numeric (N, D) array, but got shape "
                        f"{vectors.shape} and dtype {vectors.dtype}.")
    vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise DataError(f"{where}: {name} row {row} holds NaN or infinity; fix or drop that sample.")
    return vectors


def class_numbers(labels: np.ndarray, where: str, name: str) -> np.ndarray:
    """`labels` as int64, one per sample, as both training and `predict` read them. Float labels are fine when
    whole (3.0 from a CSV or .mat), but never truncated; text, one-hot rows and numbers beyond int64 (which the
    cast would wrap below 0: 2**64 - 1 becomes -1) are refused."""
    labels = np.asarray(labels)
    if np.squeeze(labels).ndim > 1:  # flattened, 54 one-hot rows of 10 classes would count as 540 labels
        if _one_hot(labels):
            raise DataError(f"{where}: {name} looks one-hot, {labels.shape}: one column per class; give each "
                            "sample its class number instead, e.g. labels.argmax(axis=1).")
        raise DataError(f"{where}: {name} must hold one label per sample, (N,), but has shape {labels.shape}.")
    labels = labels.reshape(-1)
    if labels.dtype.kind in "SU":
        raise DataError(f"{where}: {name} holds text ({str(labels[0])!r}, ...), not class numbers; number the classes "
                        "0..C-1 and give each sample its class's number.")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{where}: {name} must hold integer labels, but got dtype {labels.dtype}.")
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.floor(labels))]
        if bad.size:
            raise DataError(f"{where}: {name} must hold whole-number labels, but holds {bad[0]}; fix those labels "
                            "or drop their images.")
    # checked before the cast, which wraps a uint64 above 2**63 - 1 below 0 and makes any float beyond int64 -2**63
    if labels.size and not (-2**63 <= labels.min() and labels.max() < 2**63):
        far = labels.max() if labels.max() >= 2**63 else labels.min()
        raise DataError(f"{where}: {name} holds label {far}, too far from 0 to be a class number; labels must be class "
                        "numbers 0..C-1, one per class.")
    return labels.astype(np.int64)


def check_classes(labels: np.ndarray, n_classes: int, where: str, name: str, whose: str, remedy: str) -> None:
    """Every label one of the classes 0..n_classes-1 `whose` (the training labels, an exported student) has."""
    outside = labels[(labels < 0) | (labels >= n_classes)]
    if outside.size:
        from_one = labels.min() == 1 and labels.max() == n_classes
        raise DataError(f"{where}: {name} {outside[0]} is none of the {n_classes} classes {whose} (0.."
                        f"{n_classes - 1}); {remedy}" + (" (these count from 1: subtract 1)." if from_one else "."))


def _one_hot(labels: np.ndarray) -> bool:
    """Rows of 0s and 1s with one 1 each: one column per class."""
    return (labels.ndim == 2 and labels.dtype.kind in "biuf" and bool(np.isin(labels, (0, 1)).all())
            and bool((labels.sum(axis=1) == 1).all()))
