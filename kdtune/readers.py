"""Readers for the image formats users have: npz, MNIST's IDX files, EMNIST's MATLAB file and Kaggle CSVs, and
the Fashion-MNIST subset shipped with kdtune.

Every reader returns a `Dataset` as the files hold it: images (N, H, W) and labels as stored. A file that is
missing, cut short or holds something else is one `DataError` naming it; orienting, relabelling and checking
that the arrays make a classification dataset is `data.load`'s job.
"""

from __future__ import annotations

import csv
import gzip
import math
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kdtune.spec import SpecError


class DataError(SpecError):
    """A data file is missing, unreadable or holds arrays that cannot be a classification dataset."""


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 pixels, (N, H, W) grey or (N, H, W, C) colour, or float32 feature vectors (N, D)."""

    x_train: np.ndarray
    y_train: np.ndarray  # (N,) int64 in 0..C-1
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] | None = None  # label c's name, where the files name the classes

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def read_npz(path: Path) -> Dataset:
    keys = ("x_train", "y_train", "x_test", "y_test")
    path = existing_file(path, "format 'npz' needs the .npz file itself")
    remedy = f"re-create it with numpy.savez({path.name!r}, {'=..., '.join(keys)}=...)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays = {k: loaded[k] for k in keys if k in loaded.files}
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{path} is not a readable .npz archive ({error}); {remedy}.") from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds one array, as a .npy file does, not an .npz archive; {remedy}.")
    missing = sorted(set(keys) - set(arrays))
    if missing:
        raise DataError(f"{path} lacks arrays {missing}; an .npz needs {', '.join(keys)}.")
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # np.load hands back a member that is not a .npy file as bytes
            raise DataError(f"{path}: {key} is not a NumPy array; {remedy}.")
    return Dataset(*(arrays[k] for k in keys))


def read_embedded(path: Path | None = None) -> Dataset:
    """The Fashion-MNIST subset shipped in kdtune/datasets (see its README for provenance)."""
    with resources.as_file(resources.files("kdtune.datasets") / "fashion-mnist-small.npz") as bundled:
        return read_npz(bundled)


def read_idx_file(path: Path) -> np.ndarray:
    """One IDX file (the MNIST/EMNIST/Fashion-MNIST binary format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise DataError(f"{path} is a damaged gzip file ({error}); download or copy it again.") from error
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); is it the right file?")
    n_dims = raw[3]
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated inside its header; download or copy it again.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if body.size != math.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} bytes of data.")
    return body.reshape(shape)


def read_idx(folder: Path) -> Dataset:
    """A folder holding the four IDX files, found by the names both MNIST and EMNIST use."""
    folder = existing_folder(folder, "format 'idx' needs the folder holding the four IDX files")
    arrays = [read_idx_file(_find_one(folder, patterns)) for patterns in (
        ("*train-images*",), ("*train-labels*",), ("*t10k-images*", "*test-images*"),
        ("*t10k-labels*", "*test-labels*"))]
    return Dataset(*arrays)


def read_emnist_mat(path: Path) -> Dataset:
    """The official EMNIST MATLAB file: dataset.train.images (N x 784, row-major), dataset.train.labels."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = existing_file(path, "format 'emnist-mat' needs the EMNIST .mat file itself")
    try:
        dataset = loadmat(path, simplify_cells=True)["dataset"]
        parts = [(dataset[split]["images"], dataset[split]["labels"]) for split in ("train", "test")]
    # scipy reports a cut or foreign file as MatReadError, OSError or ValueError, a v7.3 (HDF5) file as
    # NotImplementedError; the lookups fail with the others when the layout is not EMNIST's
    except (MatReadError, OSError, NotImplementedError, KeyError, IndexError, TypeError, ValueError) as error:
        raise DataError(f"{path} is not an official EMNIST .mat file ({error!r}).") from error
    (x_train, y_train), (x_test, y_test) = parts
    return Dataset(_rows_to_images(x_train, path), y_train, _rows_to_images(x_test, path), y_test)


def read_emnist_csv(folder: Path) -> Dataset:
    """The Kaggle EMNIST CSVs: one image per row, the label then 784 pixels, no header."""
    folder = existing_folder(folder, "format 'emnist-csv' needs the folder holding *train*.csv and *test*.csv")
    arrays = []
    for patterns in (("*train*.csv",), ("*test*.csv",)):
        path = _find_one(folder, patterns)
        rows = _read_csv_numbers(path)
        arrays += [_rows_to_images(rows[:, 1:], path), rows[:, 0]]
    return Dataset(arrays[0], arrays[1], arrays[2], arrays[3])


def read_image_folder(folder: Path) -> Dataset:
    """train/<class>/*.png|jpg and test/<class>/...: see kdtune.image_folder (imported here, not at the top: it
    builds on this module)."""
    from kdtune.image_folder import read_folder

    return read_folder(folder)


READERS = {  # keyed by spec.DATA_FORMATS
    "embedded": read_embedded,
    "npz": read_npz,
    "features": read_npz,  # the same archive, holding (N, D) vectors: `data.load` checks them as such
    "idx": read_idx,
    "folder": read_image_folder,
    "emnist-mat": read_emnist_mat,
    "emnist-csv": read_emnist_csv,
}


def existing_file(path: Path | None, needs: str) -> Path:
    if path is not None and path.is_dir():
        raise DataError(f"data.path {path} is a folder, but {needs}; set data.path to that file.")
    if path is None or not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.path in the spec.")
    return path


def existing_folder(folder: Path | None, needs: str) -> Path:
    if folder is not None and folder.is_file():
        raise DataError(f"data.path {folder} is a file, but {needs}; set data.path to that folder.")
    if folder is None or not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; {needs}: check data.path in the spec.")
    return folder


def _find_one(folder: Path, patterns: tuple[str, ...]) -> Path:
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise DataError(f"{folder}: expected one file matching {' or '.join(patterns)}, found {what}.")
    return found[0]


def _read_csv_numbers(path: Path) -> np.ndarray:
    """One row per non-empty line, each as long as the first: int64, or float64 where a line holds "3.0"."""
    rows: list[list] = []
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            for row in filter(None, reader):
                if rows and len(row) != len(rows[0]):
                    raise DataError(f"{path}: line {reader.line_num} holds {len(row)} values but the first line holds "
                                    f"{len(rows[0])}; every line must be a label, then the same number of pixels.")
                rows.append(_numbers(row, path, reader.line_num))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is not a readable text CSV ({error}); expected a label, then the pixels, per "
                        "line.") from error
    if not rows:
        raise DataError(f"{path} has no rows; expected one image per line: a label, then the pixels.")
    return np.array(rows)


def _numbers(row: list[str], path: Path, line: int) -> list:
    try:
        return [int(v) for v in row]  # the common case, and small ints are shared objects: a full CSV fits
    except ValueError:
        pass
    try:
        return [float(v) for v in row]  # pandas writes a float column as "3.0"; labels and pixels are checked later
    except ValueError as error:
        raise DataError(f"{path}, line {line}: {error}; expected a label, then the pixels, as numbers.") from error


def _rows_to_images(rows: np.ndarray, path: Path) -> np.ndarray:
    rows = np.asarray(rows)
    n_pixels = rows.shape[-1] if rows.ndim == 2 else 0
    side = math.isqrt(n_pixels)
    if n_pixels == 0 or side * side != n_pixels:
        raise DataError(f"{path}: image rows must hold a square number of pixels, but got shape {rows.shape}.")
    if rows.size and not (0 <= rows.min() and rows.max() <= 255):
        raise DataError(f"{path}: pixel values must lie in 0..255, but range over {rows.min()}..{rows.max()}.")
    if rows.dtype.kind == "f" and not np.array_equal(rows, np.floor(rows)):
        raise DataError(f"{path}: pixel values must be whole numbers 0..255, but some have a fraction.")
    return rows.astype(np.uint8).reshape(-1, side, side)
