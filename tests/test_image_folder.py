"""The image-folder reader on tiny folders of 8x6 PNGs written here: order, labels, pixels, colour and every error."""

import re
import sys
from shutil import rmtree

import numpy as np
import pytest
from conftest import write_png_claiming
from PIL import Image, PngImagePlugin

from kdtune.image_folder import read_folder
from kdtune.readers import DataError

W, H = 8, 6
# Class folders and files are written out of name order, so reading in creation or directory order fails
TRAIN = {"zebra": ["c.png", "a.png"], "ant": ["b.png", "C.PNG", "a.png"], "moth": ["a.png"]}
TEST = {"moth": ["x.png", "w.png"], "zebra": ["y.png"]}  # test/ lacks ant, which is allowed
CLASS_NAMES = ("ant", "moth", "zebra")
TRAIN_ORDER = [("ant", "C.PNG"), ("ant", "a.png"), ("ant", "b.png"), ("moth", "a.png"), ("zebra", "a.png"),
               ("zebra", "c.png")]
TEST_ORDER = [("moth", "w.png"), ("moth", "x.png"), ("zebra", "y.png")]


def grey_pixels(k: int) -> np.ndarray:
    """Different for each k, and asymmetric: a transposed, flipped or swapped image differs."""
    return (np.arange(H * W).reshape(H, W) * 3 + 7 * k).astype(np.uint8)


def write(path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, format="PNG")


@pytest.fixture
def folder(tmp_path):
    """The grey layout above; returns the root and the pixels written, keyed by (split, class, file)."""
    written = {}
    for split, classes in (("train", TRAIN), ("test", TEST)):
        for name, files in classes.items():
            for file in files:
                written[split, name, file] = grey_pixels(len(written))
                write(tmp_path / split / name / file, written[split, name, file])
    return tmp_path, written


def test_grey_folder_reads_every_image_in_name_order_with_labels_from_sorted_class_folders(folder):
    root, written = folder
    data = read_folder(root)
    assert data.class_names == CLASS_NAMES
    assert data.x_train.shape == (6, H, W) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (3, H, W) and data.x_test.dtype == np.uint8
    assert data.y_train.dtype == np.int64 and data.y_train.tolist() == [0, 0, 0, 1, 2, 2]
    assert data.y_test.dtype == np.int64 and data.y_test.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(data.x_train, [written["train", *key] for key in TRAIN_ORDER])
    np.testing.assert_array_equal(data.x_test, [written["test", *key] for key in TEST_ORDER])


def test_one_colour_image_makes_every_image_rgb_with_grey_ones_in_all_three_channels(folder):
    root, written = folder
    grey = written["test", "zebra", "y.png"]
    colour = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    write(root / "test" / "zebra" / "y.png", colour)  # the last image read: train/ was read all grey before it
    data = read_folder(root)
    assert data.x_train.shape == (6, H, W, 3) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (3, H, W, 3) and data.x_test.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(data.x_train[..., channel], [written["train", *key] for key in TRAIN_ORDER])
        np.testing.assert_array_equal(data.x_test[:2, ..., channel], [written["test", *k] for k in TEST_ORDER[:2]])
    np.testing.assert_array_equal(data.x_test[2], colour)


def test_an_image_of_another_size_is_an_error_naming_it_its_size_and_the_first_image(folder):
    root, _ = folder
    odd = root / "test" / "moth" / "x.png"
    write(odd, grey_pixels(0).T.copy())
    first = root / "train" / "ant" / "C.PNG"
    with pytest.raises(DataError, match=re.escape(f"{odd} is 6x8 pixels but {first} is 8x6")):
        read_folder(root)


def garbage(path) -> None:
    path.write_bytes(b"this is not a PNG file at all")


def truncated(path) -> None:
    write(path, np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-30])  # cuts into the pixel data but leaves the header whole
    with Image.open(path):  # so opening succeeds and only decoding the pixels fails
        pass


@pytest.mark.parametrize("damage", [garbage, truncated])
def test_an_unreadable_image_is_an_error_naming_it(folder, damage):
    root, _ = folder
    bad = root / "train" / "moth" / "a.png"
    damage(bad)
    with pytest.raises(DataError, match=re.escape(f"{bad}: cannot read this image")):
        read_folder(root)


def sixteen_bit(pixels: np.ndarray) -> np.ndarray:
    """The same picture at 16 bits, p * 257 (255 -> 65535) off by 100, as another tool may round: still p."""
    return (pixels.astype(np.int64) * 257 + np.where(pixels < 128, 100, -100)).astype(np.uint16)


@pytest.mark.parametrize("as_pillow_10_opens_it", [False, True])
def test_a_16_bit_grey_image_reads_as_the_same_picture_at_8_bits(folder, monkeypatch, as_pillow_10_opens_it):
    root, written = folder
    wide = root / "train" / "zebra" / "a.png"
    write(wide, sixteen_bit(written["train", "zebra", "a.png"]))
    if as_pillow_10_opens_it:  # Pillow 10 opens 16-bit grey PNGs as "I", 32-bit ints (pyproject allows it)
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    with Image.open(wide) as image:
        assert image.mode == ("I" if as_pillow_10_opens_it else "I;16") and np.asarray(image).max() > 255
    data = read_folder(root)
    assert data.x_train.dtype == np.uint8
    np.testing.assert_array_equal(data.x_train, [written["train", *key] for key in TRAIN_ORDER])


def test_an_image_claiming_more_pixels_than_pillow_decodes_safely_is_an_error_naming_it(folder):
    root, _ = folder
    bomb = write_png_claiming(root / "train" / "moth" / "a.png", 30000, 30000)  # 900 M pixels
    with pytest.raises(DataError, match=re.escape(f"{bomb} is too big to decode safely (Image size (900000000 "
                                                  "pixels) exceeds limit")):
        read_folder(root)


@pytest.mark.parametrize("break_layout, message", [
    (lambda root: (root / "test" / "bee").mkdir(), r"test/bee is not one of the classes in .*\(ant, moth, zebra\)"),
    (lambda root: (root / "train" / "bee").mkdir(), r"train/bee holds no images"),
    (lambda root: rmtree(root / "test"), r"has no test/ folder; format 'folder' expects train/<class>/\*\.png\|jpg"),
    (lambda root: rmtree(root / "train"), r"has no train/ folder"),
    (lambda root: [rmtree(d) for d in (root / "train").iterdir()], r"train holds no class folders"),
    (lambda root: [rmtree(d) for d in (root / "test").iterdir()], r"test holds no images in any class folder"),
    (lambda root: rmtree(root), r"does not exist; format 'folder' needs a folder laid out as train/<class>"),
])
def test_a_broken_layout_is_an_error_naming_what_is_wrong(folder, break_layout, message):
    root, _ = folder
    break_layout(root)
    with pytest.raises(DataError, match=message):
        read_folder(root)


def test_hidden_entries_and_files_without_an_image_suffix_are_ignored(folder):
    root, written = folder
    for class_dir in [root / "train", root / "test", *(root / "train").iterdir(), *(root / "test").iterdir()]:
        (class_dir / "README.txt").write_text("not an image")
        (class_dir / ".DS_Store").write_bytes(b"\0\1\2")
    garbage(root / "train" / "ant" / "._a.png")  # macOS's resource-fork copy: hidden, with an image suffix
    write(root / "train" / ".ipynb_checkpoints" / "a.png", grey_pixels(0))  # would be a class
    write(root / "test" / ".ipynb_checkpoints" / "a.png", grey_pixels(0))  # would not be a train class
    data = read_folder(root)
    assert data.class_names == CLASS_NAMES
    np.testing.assert_array_equal(data.x_train, [written["train", *key] for key in TRAIN_ORDER])
    np.testing.assert_array_equal(data.x_test, [written["test", *key] for key in TEST_ORDER])


def test_without_pillow_the_error_says_how_to_install_it(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(DataError, match=re.escape('pip install "kdtune[images]"')):
        read_folder(folder[0])
