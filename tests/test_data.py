"""Every reader on fixtures written here in its exact on-disk format; validation; the split."""

import gzip

import numpy as np
import pytest
import scipy.io

from kdtune.data import DataError, fingerprint, load, read_embedded, read_idx_file, stratified_split
from kdtune.spec import DataSpec


@pytest.fixture
def upright():
    """Real, asymmetric images (a transposed image differs from the upright one) with labels 0..9."""
    full = read_embedded()
    pick = np.concatenate([np.flatnonzero(full.y_train == c)[:3] for c in range(10)])
    return full.x_train[pick], full.y_train[pick].astype(np.int64)


def write_idx(path, array, compress):
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_idx_folder(folder, x, y, *, prefix, test_name, compress):
    folder.mkdir()
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}train-images-idx3-ubyte{suffix}", x, compress)
    write_idx(folder / f"{prefix}train-labels-idx1-ubyte{suffix}", y, compress)
    write_idx(folder / f"{prefix}{test_name}-images-idx3-ubyte{suffix}", x[:10], compress)
    write_idx(folder / f"{prefix}{test_name}-labels-idx1-ubyte{suffix}", y[:10], compress)


def test_embedded_data_is_balanced_real_fashion_mnist():
    data = read_embedded()
    assert data.x_train.shape == (6000, 28, 28) and data.x_test.shape == (1000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [600] * 10
    assert np.bincount(data.y_test).tolist() == [100] * 10


def test_npz_reader(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    data = load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))
    assert np.array_equal(data.x_train, x) and data.y_test.tolist() == y[:5].tolist()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_fashion_mnist_names(tmp_path, upright, compress):
    x, y = upright
    write_idx_folder(tmp_path / "f", x, y, prefix="", test_name="t10k", compress=compress)
    data = load(DataSpec(format="idx", path=str(tmp_path / "f")))
    assert np.array_equal(data.x_train, x) and np.array_equal(data.y_train, y) and len(data.x_test) == 10


def test_idx_reader_emnist_letters_transposed_and_offset(tmp_path, upright):
    x, y = upright
    write_idx_folder(tmp_path / "e", x.transpose(0, 2, 1), y + 1, prefix="emnist-letters-", test_name="test",
                     compress=True)
    data = load(DataSpec(format="idx", path=str(tmp_path / "e"), transpose=True, label_offset=1))
    assert np.array_equal(data.x_train, x) and np.array_equal(data.y_train, y)


def test_emnist_mat_reader(tmp_path, upright):
    x, y = upright
    def part(images, labels):  # official layout: N x 784 rows of the transposed image, N x 1 labels 1..26
        return {"images": images.transpose(0, 2, 1).reshape(len(images), -1), "labels": (labels + 1)[:, None],
                "writers": np.zeros((len(images), 1))}
    scipy.io.savemat(tmp_path / "emnist-letters.mat", {"dataset": {
        "train": part(x, y), "test": part(x[:4], y[:4]), "mapping": np.arange(26)[:, None]}})
    data = load(DataSpec(format="emnist-mat", path=str(tmp_path / "emnist-letters.mat"), label_offset=1))
    assert np.array_equal(data.x_train, x) and np.array_equal(data.y_train, y) and len(data.x_test) == 4


def test_emnist_csv_reader(tmp_path, upright):
    x, y = upright
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, images, labels in (("emnist-letters-train.csv", x, y), ("emnist-letters-test.csv", x[:4], y[:4])):
        rows = np.column_stack([labels + 1, images.transpose(0, 2, 1).reshape(len(images), -1)])
        np.savetxt(folder / name, rows, fmt="%d", delimiter=",")
    data = load(DataSpec(format="emnist-csv", path=str(folder), label_offset=1))
    assert np.array_equal(data.x_train, x) and np.array_equal(data.y_train, y)


def test_labels_starting_at_one_get_a_hint(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y + 1, x_test=x, y_test=y + 1)
    with pytest.raises(DataError, match="label_offset = 1"):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


@pytest.mark.parametrize("arrays, message", [
    (lambda x, y: dict(x_train=x[:0], y_train=y[:0], x_test=x, y_test=y), "non-empty"),
    (lambda x, y: dict(x_train=x.reshape(len(x), -1), y_train=y, x_test=x, y_test=y), "(N, H, W)"),
    (lambda x, y: dict(x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y), "uint8"),
    (lambda x, y: dict(x_train=x, y_train=y[:-1], x_test=x, y_test=y), "labels in y_train"),
    (lambda x, y: dict(x_train=x, y_train=y, x_test=x[:, :20], y_test=y), "test images are"),
    (lambda x, y: dict(x_train=x, y_train=y, x_test=x, y_test=y + 10), "never occurs"),
    (lambda x, y: dict(x_train=x, y_train=y), "lacks arrays"),
])
def test_malformed_arrays_are_refused(tmp_path, upright, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays(*upright))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


def test_truncated_and_foreign_idx_files(tmp_path, upright):
    write_idx(tmp_path / "a", upright[0], compress=False)
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx_file(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="magic"):
        read_idx_file(tmp_path / "c")


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, val = stratified_split(labels, 0.1, seed=1)
    assert np.bincount(labels[val]).tolist() == [10, 5, 3, 2]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    again, _ = stratified_split(labels, 0.1, seed=1)
    other, _ = stratified_split(labels, 0.1, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_fingerprint_names_the_data_and_the_split():
    data = read_embedded()
    a = stratified_split(data.y_train, 0.1, seed=0)
    b = stratified_split(data.y_train, 0.1, seed=1)
    assert fingerprint(data, *a) == fingerprint(data, *a) != fingerprint(data, *b)
