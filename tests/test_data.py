"""Every reader on fixtures written here in its exact on-disk format; validation; the split."""

import gzip
import re
import zipfile

import numpy as np
import pytest
import scipy.io
import torch

from kdtune.data import fingerprint, load, prepare, raw_samples, raw_shape, stratified_split
from kdtune.readers import DataError, Dataset, read_embedded, read_idx_file
from kdtune.spec import DataSpec, SpecError, load_spec


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


def test_emnist_csv_transpose_false_loads_an_upright_csv_upright(tmp_path, upright):
    x, y = upright
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, images, labels in (("train.csv", x, y), ("test.csv", x[:4], y[:4])):
        np.savetxt(folder / name, np.column_stack([labels, images.reshape(len(images), -1)]), fmt="%d", delimiter=",")
    data = load(DataSpec(format="emnist-csv", path=str(folder), transpose=False))
    assert np.array_equal(data.x_train, x)


def write_csv_folder(folder, train_text):
    folder.mkdir()
    (folder / "train.csv").write_bytes(train_text)
    (folder / "test.csv").write_text("0," + ",".join(["0"] * 16) + "\n")


def write_npy(path, x, y):
    with path.open("wb") as f:
        np.save(f, x)


def write_npz_with_bytes_for_x_train(path, x, y):
    with path.open("wb") as f:  # a file object: np.savez would add .npz to a path
        np.savez(f, y_train=y, x_test=x, y_test=y)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("x_train.npy", b"hello")  # np.load hands back a member without the .npy magic as bytes


def write_mat_cut(path, x, y):
    scipy.io.savemat(path, {"dataset": {"train": {"images": x.reshape(len(x), -1), "labels": y[:, None]}}})
    path.write_bytes(path.read_bytes()[:len(x) * 28 * 28 // 2])


def write_idx_cut(folder, x, y, n_bytes):
    write_idx_folder(folder, x, y, prefix="", test_name="t10k", compress=True)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:n_bytes])


# (format, what to write at tmp_path / "d" given the upright images and labels, what the message must say)
MALFORMED_FILES = {
    "idx gz cut in half": ("idx", lambda d, x, y: write_idx_cut(d, x, y, 300), "train-images-idx3-ubyte.gz"),
    "idx gz header cut": ("idx", lambda d, x, y: write_idx_cut(d, x, y, 15), "train-images-idx3-ubyte.gz"),
    "idx header claiming 0 images": (
        "idx", lambda d, x, y: write_idx_folder(d, x[:0], y[:0], prefix="", test_name="t10k", compress=False),
        "holds no images"),
    "idx path is a file": ("idx", lambda d, x, y: d.write_bytes(b"x"),
                           "is a file, but format 'idx' needs the folder holding the four IDX files"),
    "csv of labels only": ("emnist-csv", lambda d, x, y: write_csv_folder(d, b"1\n2\n"), "train.csv"),
    "csv ragged": ("emnist-csv", lambda d, x, y: write_csv_folder(d, b"1,0,0,0,0\n2,0,0,0\n"), "line 2 holds 4"),
    "csv not text": ("emnist-csv", lambda d, x, y: write_csv_folder(d, b"\xff\xfe\x00\x81"), "train.csv"),
    "csv path is a file": ("emnist-csv", lambda d, x, y: d.write_bytes(b"x"), "is a file"),
    "mat cut in half": ("emnist-mat", write_mat_cut, "not an official EMNIST .mat file"),
    "mat is text": ("emnist-mat", lambda d, x, y: d.write_text("label,pixels\n" * 20), "not an official EMNIST"),
    "npz is a .npy": ("npz", write_npy, "holds one array"),
    "npz member not an array": ("npz", write_npz_with_bytes_for_x_train, "x_train is not"),
    "npz path is a folder": ("npz", lambda d, x, y: d.mkdir(), "is a folder"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_FILES))
def test_malformed_files_are_one_line_data_errors_naming_the_file(tmp_path, upright, case):
    data_format, write, message = MALFORMED_FILES[case]
    write(tmp_path / "d", *upright)
    with pytest.raises(DataError) as error:
        load(DataSpec(format=data_format, path=str(tmp_path / "d")))
    assert message in str(error.value) and str(tmp_path / "d") in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_npz_only_says_it_does_not_exist(tmp_path):
    with pytest.raises(DataError) as error:
        load(DataSpec(format="npz", path=str(tmp_path / "nowhere.npz")))
    assert str(error.value) == f"data file {tmp_path / 'nowhere.npz'} does not exist; check data.path in the spec."


@pytest.mark.parametrize("bad, shown", [(np.nan, "nan"), (np.inf, "inf"), (0.7, "0.7")])
def test_non_integer_labels_are_refused_with_an_example(tmp_path, upright, bad, shown):
    x, y = upright
    labels = y.astype(np.float64)
    labels[5] = bad
    np.savez(tmp_path / "d.npz", x_train=x, y_train=labels, x_test=x, y_test=y)
    with pytest.raises(DataError, match=f"d.npz: y_train must hold whole-number labels, but holds {shown}"):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


def test_integer_valued_float_labels_are_accepted(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y.astype(np.float64), x_test=x, y_test=y.astype(np.float32))
    assert np.array_equal(load(DataSpec(format="npz", path=str(tmp_path / "d.npz"))).y_train, y)


def test_a_csv_of_integer_valued_floats_loads(tmp_path, upright):
    x, y = upright
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, images, labels in (("train.csv", x, y), ("test.csv", x[:4], y[:4])):
        np.savetxt(folder / name, np.column_stack([labels, images.reshape(len(images), -1)]), fmt="%.1f",
                   delimiter=",")
    assert np.array_equal(load(DataSpec(format="emnist-csv", path=str(folder), transpose=False)).x_train, x)


@pytest.mark.parametrize("labels, message", [
    (lambda y: np.zeros_like(y), "every training image has label 0; a classifier needs at least 2 classes"),
    (lambda y: np.where(np.arange(len(y)) < 28, y, 10), "class 9 has only 1 training image;"),
    (lambda y: np.where(np.arange(len(y)) < 28, y, 10**12), "no training image has label 10, but labels must "
                                                             "run 0..C-1 and the largest is 1000000000000"),
])
def test_classes_the_split_cannot_serve_are_refused(tmp_path, upright, labels, message):
    x, y = upright  # 3 images per class 0..9, sorted by class
    np.savez(tmp_path / "d.npz", x_train=x, y_train=labels(y), x_test=x[:1], y_test=y[:1])
    with pytest.raises(DataError, match=message):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


@pytest.mark.parametrize("huge, shown", [(np.uint64(2**64 - 1), "18446744073709551615"),
                                         (np.uint64(2**63), "9223372036854775808"), (1e19, "1e+19")])
def test_a_label_beyond_int64_is_named_as_too_large_not_as_below_0(tmp_path, upright, huge, shown):
    x, y = upright
    labels = y.astype(np.asarray(huge).dtype)
    labels[5] = huge
    np.savez(tmp_path / "d.npz", x_train=x, y_train=labels, x_test=x, y_test=y)
    with pytest.raises(DataError, match=re.escape(f"d.npz: y_train holds label {shown}, too far from 0 to be a "
                                                  "class number")):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


@pytest.mark.parametrize("labels, message", [
    (lambda y: np.eye(10, dtype=np.float32)[y], "y_train looks one-hot, (30, 10): one column per class; give each "
                                                "sample its class number instead, e.g. labels.argmax(axis=1)."),
    (lambda y: np.stack([y, y], axis=1), "y_train must hold one label per sample, (N,), but has shape (30, 2)."),
    (lambda y: y[:, None], None),  # a column of labels is one label per sample
])
def test_labels_must_be_one_class_number_per_sample(tmp_path, upright, labels, message):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x, y_train=labels(y), x_test=x, y_test=y)
    if message is None:
        assert np.array_equal(load(DataSpec(format="npz", path=str(tmp_path / "d.npz"))).y_train, y)
        return
    with pytest.raises(DataError, match=re.escape(message)):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


def test_images_below_the_teachers_minimum_are_refused_with_a_remedy(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x[:, :3, :3], y_train=y, x_test=x[:, :3, :3], y_test=y)
    with pytest.raises(DataError, match="images are 3x3 pixels.*pad or resize the images to at least 4x4"):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))
    np.savez(tmp_path / "d.npz", x_train=x[:, :8, :8], y_train=y, x_test=x[:, :8, :8], y_test=y)
    assert load(DataSpec(format="npz", path=str(tmp_path / "d.npz"))).x_train.shape[1:] == (8, 8)


def test_labels_starting_at_one_get_a_hint(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y + 1, x_test=x, y_test=y + 1)
    with pytest.raises(DataError, match="label_offset = 1"):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))


@pytest.mark.parametrize("arrays, message", [
    (lambda x, y: dict(x_train=x[:0], y_train=y[:0], x_test=x, y_test=y), "x_train holds no images"),
    (lambda x, y: dict(x_train=x.reshape(len(x), -1), y_train=y, x_test=x, y_test=y), "(N, H, W)"),
    (lambda x, y: dict(x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y), "uint8"),
    (lambda x, y: dict(x_train=x, y_train=y[:-1], x_test=x, y_test=y), "labels in y_train"),
    (lambda x, y: dict(x_train=x, y_train=y, x_test=x[:, :20], y_test=y), "test samples are"),
    (lambda x, y: dict(x_train=x, y_train=y, x_test=x, y_test=y + 10),
     "test label 10 is none of the 10 classes in the training labels (0..9); relabel or drop"),
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


# ------------------------------------------------------------------ colour, layouts, feature vectors, folders

def colour_of(x):
    """Colour images (N, H, W, 3) whose channels differ, from grey ones."""
    return np.stack([x, 255 - x, x // 2], axis=-1)


def test_colour_images_load_alike_from_either_layout(tmp_path, upright):
    x, y = upright
    colour = colour_of(x)
    np.savez(tmp_path / "nhwc.npz", x_train=colour, y_train=y, x_test=colour[:5], y_test=y[:5])
    np.savez(tmp_path / "nchw.npz", x_train=colour.transpose(0, 3, 1, 2), y_train=y,
             x_test=colour[:5].transpose(0, 3, 1, 2), y_test=y[:5])
    nhwc = load(DataSpec(format="npz", path=str(tmp_path / "nhwc.npz")))
    nchw = load(DataSpec(format="npz", path=str(tmp_path / "nchw.npz")))
    assert nhwc.x_train.shape == (30, 28, 28, 3) and np.array_equal(nhwc.x_train, colour)
    assert np.array_equal(nchw.x_train, colour) and np.array_equal(nchw.x_test, colour[:5])


def test_an_ambiguous_layout_must_be_declared(tmp_path, upright):
    x, y = upright
    tiny = colour_of(x[:, :3, :3])  # (N, 3, 3, 3): channels could be either axis
    np.savez(tmp_path / "d.npz", x_train=tiny, y_train=y, x_test=tiny, y_test=y)
    with pytest.raises(DataError, match='ambiguous; set data.layout = "nhwc" or "nchw"'):
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz")))
    with pytest.raises(DataError, match="CNNs need at least 4x4"):  # declared, it reads; then it is too small
        load(DataSpec(format="npz", path=str(tmp_path / "d.npz"), layout="nhwc"))
    four = np.concatenate([colour_of(x), x[..., None]], axis=-1)
    np.savez(tmp_path / "rgba.npz", x_train=four, y_train=y, x_test=four, y_test=y)
    with pytest.raises(DataError, match="1 or 3 channels"):
        load(DataSpec(format="npz", path=str(tmp_path / "rgba.npz")))


def test_one_channel_images_are_grey_images_with_the_same_fingerprint(tmp_path, upright):
    x, y = upright
    np.savez(tmp_path / "grey.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.savez(tmp_path / "one.npz", x_train=x[..., None], y_train=y, x_test=x[:5, None], y_test=y[:5])
    grey = prepare(DataSpec(format="npz", path=str(tmp_path / "grey.npz")), seed=0)
    one = prepare(DataSpec(format="npz", path=str(tmp_path / "one.npz")), seed=0)
    assert one.fingerprint == grey.fingerprint and one.input_shape == grey.input_shape == (1, 28, 28)


def test_colour_splits_feed_models_channels_first_and_come_back_exactly(tmp_path, upright):
    x, y = upright
    colour = colour_of(x)
    np.savez(tmp_path / "d.npz", x_train=colour, y_train=y, x_test=colour[:5], y_test=y[:5])
    splits = prepare(DataSpec(format="npz", path=str(tmp_path / "d.npz")), seed=0)
    assert splits.input_shape == (3, 28, 28) and splits.x_train.is_contiguous()
    assert torch.equal(splits.x_test[:, 1], torch.tensor(255 - x[:5], dtype=torch.float32) / 255)  # channel 1
    assert np.array_equal(raw_samples(splits.x_test).numpy(), colour[:5])
    assert raw_shape(splits.input_shape) == (28, 28, 3) and raw_shape((1, 28, 28)) == (28, 28)


def test_feature_vectors_load_as_float32_and_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)), np.arange(40) % 4
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    splits = prepare(DataSpec(format="features", path=str(tmp_path / "f.npz")), seed=0)
    assert splits.input_shape == (6,) and splits.x_train.dtype == torch.float32
    assert np.allclose(np.sort(splits.x_val.numpy(), axis=0), np.sort(x.astype(np.float32)[splits.val_rows], axis=0))
    assert raw_shape((6,)) == (6,) and torch.equal(raw_samples(splits.x_test), splits.x_test)
    x[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    with pytest.raises(DataError, match="x_train row 3 holds NaN"):
        load(DataSpec(format="features", path=str(tmp_path / "nan.npz")))
    np.savez(tmp_path / "3d.npz", x_train=x.reshape(40, 2, 3), y_train=y, x_test=x[:8], y_test=y[:8])
    with pytest.raises(DataError, match=r"numeric \(N, D\) array"):
        load(DataSpec(format="features", path=str(tmp_path / "3d.npz")))
    features = {"format": "features", "path": "f.npz"}
    for section, wrong in (("data", {**features, "transpose": True}),
                           ("teacher", {"logits": "l.npz", "augment": "shift"}), ("teacher", {}),
                           ("student", {"family": "cnn"})):
        sections = {"data": features, "teacher": {"logits": "l.npz"}, section: wrong}
        with pytest.raises(SpecError, match='needs images, but data.format = "features" holds vectors'):
            load_spec(None, **sections)
    assert load_spec(None, data=features, teacher={"logits": "l.npz"}).data.format == "features"


def test_an_image_folder_loads_through_the_spec_with_its_class_names(tmp_path):
    from PIL import Image

    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("boot", "shirt")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 5), 40 * c + i, dtype=np.uint8)).save(tmp_path / split / name / f"{i}.png")
    splits = prepare(DataSpec(format="folder", path=str(tmp_path)), seed=0)
    assert splits.class_names == ("boot", "shirt") and splits.input_shape == (1, 6, 5)
    assert sorted(splits.y_test.tolist()) == [0, 0, 1, 1]
    unnamed = read_embedded()
    idx = stratified_split(unnamed.y_train, 0.1, seed=0)
    named = Dataset(unnamed.x_train, unnamed.y_train, unnamed.x_test, unnamed.y_test, tuple("abcdefghij"))
    renamed = Dataset(unnamed.x_train, unnamed.y_train, unnamed.x_test, unnamed.y_test, tuple("abcdefghiz"))
    assert len({fingerprint(unnamed, *idx), fingerprint(named, *idx), fingerprint(renamed, *idx)}) == 3
