"""Image datasets: readers for the formats users have, validation, the train/val split and its fingerprint.

Every reader returns a `Dataset` of uint8 images (N, H, W) and int64 labels 0..C-1. The validation split
is carved from the training images (stratified, seeded) and is what the teacher's early stopping and the
whole Optuna search look at; the test images are only read by `report`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from kdtune.spec import DataSpec, SpecError


class DataError(SpecError):
    """A data file is missing, unreadable or holds arrays that cannot be a classification dataset."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # (N, H, W) uint8
    y_train: np.ndarray  # (N,) int64 in 0..C-1
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


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


# ---------------------------------------------------------------------------------------------- readers

def read_npz(path: Path) -> Dataset:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(_existing(path), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in keys if k in archive.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable .npz archive ({error}); re-create it with numpy.savez.") \
            from error
    if len(arrays) < len(keys):
        missing = sorted(set(keys) - set(arrays))
        raise DataError(f"{path} lacks arrays {missing}; an .npz needs {', '.join(keys)}.")
    return Dataset(*(arrays[k] for k in keys))


def read_embedded(path: Path | None = None) -> Dataset:
    """The Fashion-MNIST subset shipped in kdtune/datasets (see its README for provenance)."""
    with resources.as_file(resources.files("kdtune.datasets") / "fashion-mnist-small.npz") as bundled:
        return read_npz(bundled)


def read_idx_file(path: Path) -> np.ndarray:
    """One IDX file (the MNIST/EMNIST/Fashion-MNIST binary format), gzipped or not."""
    raw = _existing(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); is it the right file?")
    n_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} bytes of data.")
    return body.reshape(shape)


def read_idx(folder: Path) -> Dataset:
    """A folder holding the four IDX files, found by the names both MNIST and EMNIST use."""
    arrays = [read_idx_file(_find_one(folder, patterns)) for patterns in (
        ("*train-images*",), ("*train-labels*",), ("*t10k-images*", "*test-images*"),
        ("*t10k-labels*", "*test-labels*"))]
    return Dataset(*arrays)


def read_emnist_mat(path: Path) -> Dataset:
    """The official EMNIST MATLAB file: dataset.train.images (N x 784, row-major), dataset.train.labels."""
    from scipy.io import loadmat

    try:
        dataset = loadmat(_existing(path), simplify_cells=True)["dataset"]
        parts = [(dataset[split]["images"], dataset[split]["labels"]) for split in ("train", "test")]
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path} is not an official EMNIST .mat file ({error!r}).") from error
    (x_train, y_train), (x_test, y_test) = parts
    return Dataset(_rows_to_images(x_train, path), y_train, _rows_to_images(x_test, path), y_test)


def read_emnist_csv(folder: Path) -> Dataset:
    """The Kaggle EMNIST CSVs: one image per row, the label then 784 pixels, no header."""
    arrays = []
    for patterns in (("*train*.csv",), ("*test*.csv",)):
        path = _find_one(folder, patterns)
        with path.open(newline="") as f:
            try:
                rows = np.array([[int(v) for v in row] for row in csv.reader(f) if row], dtype=np.int64)
            except ValueError as error:
                raise DataError(f"{path} holds a non-integer value ({error}); expected label,784 pixels.") from error
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise DataError(f"{path} has no rows; expected one image per line: label, then 784 pixels.")
        arrays += [_rows_to_images(rows[:, 1:], path), rows[:, 0]]
    return Dataset(arrays[0], arrays[1], arrays[2], arrays[3])


READERS = {
    "embedded": read_embedded,
    "npz": read_npz,
    "idx": read_idx,
    "emnist-mat": read_emnist_mat,
    "emnist-csv": read_emnist_csv,
}
# EMNIST stores each 28x28 image column-major (transposed) in every official format.
TRANSPOSED_FORMATS = {"emnist-mat", "emnist-csv"}


def load(spec: DataSpec) -> Dataset:
    """Read, orient, relabel and validate the dataset a spec names."""
    raw = READERS[spec.format](Path(spec.path) if spec.path else None)
    transpose = spec.transpose or spec.format in TRANSPOSED_FORMATS
    images = [np.ascontiguousarray(x.transpose(0, 2, 1)) if transpose else x for x in (raw.x_train, raw.x_test)]
    labels = [np.asarray(y).reshape(-1).astype(np.int64) - spec.label_offset for y in (raw.y_train, raw.y_test)]
    dataset = Dataset(images[0], labels[0], images[1], labels[1])
    validate(dataset, spec)
    return dataset


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
    for x_name, y_name in (("x_train", "y_train"), ("x_test", "y_test")):
        n_images, n_labels = len(getattr(dataset, x_name)), len(getattr(dataset, y_name))
        if n_images != n_labels:
            raise DataError(f"{where}: {n_images} images in {x_name} but {n_labels} labels in {y_name}.")
    low = min(dataset.y_train.min(), dataset.y_test.min())
    if low < 0:
        raise DataError(f"{where}: labels go below 0 after data.label_offset = {spec.label_offset}; "
                        "lower label_offset.")
    counts = np.bincount(dataset.y_train, minlength=dataset.n_classes)
    if counts.min() < 2:
        empty = int(np.argmin(counts))
        hint = " Labels may start at 1: set data.label_offset = 1." if empty == 0 else ""
        raise DataError(f"{where}: class {empty} has {counts.min()} training images; every class 0..C-1 needs "
                        f"at least 2.{hint}")
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
    x = torch.tensor(images, dtype=torch.float32).div_(255.0).unsqueeze(1)
    return x, torch.tensor(labels)


def prepare(spec: DataSpec, seed: int) -> Splits:
    dataset = load(spec)
    train_idx, val_idx = stratified_split(dataset.y_train, spec.val_fraction, seed)
    x_train, y_train = to_tensors(dataset.x_train[train_idx], dataset.y_train[train_idx])
    x_val, y_val = to_tensors(dataset.x_train[val_idx], dataset.y_train[val_idx])
    x_test, y_test = to_tensors(dataset.x_test, dataset.y_test)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, dataset.n_classes,
                  fingerprint(dataset, train_idx, val_idx))


# ------------------------------------------------------------------------------------------- helpers

def _existing(path: Path | None) -> Path:
    if path is None or not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.path in the spec.")
    return path


def _find_one(folder: Path | None, patterns: tuple[str, ...]) -> Path:
    if folder is None or not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; set data.path to the folder holding the files.")
    found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise DataError(f"{folder}: expected one file matching {' or '.join(patterns)}, found {what}.")
    return found[0]


def _rows_to_images(rows: np.ndarray, path: Path) -> np.ndarray:
    rows = np.asarray(rows)
    side = int(round(np.sqrt(rows.shape[-1]))) if rows.ndim == 2 else 0
    if side * side != (rows.shape[-1] if rows.ndim == 2 else -1):
        raise DataError(f"{path}: image rows must hold a square number of pixels, but got shape {rows.shape}.")
    if rows.size and (rows.min() < 0 or rows.max() > 255):
        raise DataError(f"{path}: pixel values must lie in 0..255.")
    return rows.astype(np.uint8).reshape(-1, side, side)
