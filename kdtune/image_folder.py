"""The image-folder layout: `train/<class>/*` and `test/<class>/*`, one folder of image files per class, as
torchvision's ImageFolder and most labelled photo collections use. The files are PNG, JPEG, BMP, GIF or WebP, so
they are decoded with Pillow, an optional dependency: the other formats need only NumPy. `read_image` decodes
them for `predict` too, so that an image file gives the student the pixels it would have trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdtune.readers import DataError, Dataset, existing_folder

LAYOUT = "train/<class>/*.png|jpg, test/<class>/*.png|jpg"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
GREY_MODES = {"1", "L", "LA"}
# 16-bit grey, white at 65535; Pillow's convert("L") would clip it at 255. Pillow 10 opens a 16-bit grey PNG as
# "I" (32-bit ints), later versions as "I;16": a PNG holds at most 16 bits a channel, so its "I" is 16-bit too.
SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def read_folder(folder: Path | None) -> Dataset:
    try:
        import PIL  # noqa: F401 (read_image imports it where it decodes; here only to say how to install it)
    except ImportError:
        raise DataError("format 'folder' reads images with Pillow, which is not installed: "
                        "pip install \"kdtune[images]\"") from None
    folder = existing_folder(folder, f"format 'folder' needs a folder laid out as {LAYOUT}")
    train, test = (_split_folder(folder, split) for split in ("train", "test"))
    class_names = [d.name for d in _visible(train) if d.is_dir()]
    if not class_names:
        raise DataError(f"{train} holds no class folders; format 'folder' expects {LAYOUT}.")
    for class_dir in _visible(test):
        if class_dir.is_dir() and class_dir.name not in class_names:
            raise DataError(f"{class_dir} is not one of the classes in {train} ({', '.join(class_names)}); "
                            "rename it to one of them or remove it.")

    reader = _ImageReader()
    splits = []
    for split in (train, test):
        images, labels = [], []
        for label, name in enumerate(class_names):
            files = _image_files(split / name)
            if split is train and not files:
                raise DataError(f"{split / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add some "
                                "or remove the class folder.")
            images += [reader.read(path) for path in files]
            labels += [label] * len(files)
        if not images:
            raise DataError(f"{split} holds no images in any class folder; format 'folder' expects {LAYOUT}.")
        splits.append((images, np.array(labels, dtype=np.int64)))
    (x_train, y_train), (x_test, y_test) = ((reader.stack(images), labels) for images, labels in splits)
    return Dataset(x_train, y_train, x_test, y_test, class_names=tuple(class_names))


def read_image(path: Path, colour: bool | None = None, remedy: str = "remove or replace it") -> np.ndarray:
    """One image file as uint8 pixels, grey (H, W) or RGB (H, W, 3): RGB with `colour`, grey without it, and
    with None as the file holds it. 16-bit grey is scaled by its bit depth, v / 65535 being the same share of
    white as p / 255 at 8 bits, so a picture saved at 8 and at 16 bits gives the same pixels (within rounding).
    What `predict` and image folders both read images with; `remedy` ends the error for a file that is none."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # open() reads only the header: decoding here is what catches a truncated file
            return _pixels(image, path, colour)
    except Image.DecompressionBombError as error:  # raised by open(), from the size the header claims
        raise DataError(f"{path} is too big to decode safely ({str(error).rstrip('.')}); resize it to the size "
                        "the images should have, or remove it.") from error
    except DataError:  # _pixels' own: the file is readable, its pixels are not ours to scale
        raise
    except (OSError, SyntaxError, ValueError) as error:  # Pillow reports some damaged files as SyntaxError
        raise DataError(f"{path}: cannot read this image ({error}); {remedy}.") from error


def _pixels(image, path: Path, colour: bool | None) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_GREY_MODES or (image.mode == "I" and image.format == "PNG"):
        grey = np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)  # v * 255 / 65535
        return np.repeat(grey[..., None], 3, axis=-1) if colour else grey
    if image.mode in ("I", "F") or image.mode.startswith("I;"):  # 32-bit or signed: no bit depth says where white is
        raise DataError(f"{path} holds {image.mode} pixels, whose white the file does not say (only 8- and 16-bit "
                        "images can be scaled); save it as 8- or 16-bit grey, or as RGB.")
    grey = image.mode in GREY_MODES if colour is None else not colour
    return np.asarray(image.convert("L" if grey else "RGB"))


class _ImageReader:
    """Reads each file once (`read_image`), checking every image against the first's size; grey images are
    promoted to RGB only when stacking, once it is known whether any image has colour."""

    def __init__(self):
        self.first: Path | None = None
        self.size: tuple[int, int] | None = None
        self.any_colour = False

    def read(self, path: Path) -> np.ndarray:
        pixels = read_image(path)
        size = (pixels.shape[1], pixels.shape[0])  # (width, height), as Pillow gives sizes
        if self.size is None:
            self.first, self.size = path, size
        elif size != self.size:
            raise DataError(f"{path} is {_wxh(size)} pixels but {self.first} is {_wxh(self.size)}; every image must "
                            "be the same size: resize them to one size.")
        self.any_colour |= pixels.ndim == 3
        return pixels

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        channels = (3,) if self.any_colour else ()
        stacked = np.empty((len(images), *images[0].shape[:2], *channels), dtype=np.uint8)
        for i, pixels in enumerate(images):
            stacked[i] = pixels[..., None] if self.any_colour and pixels.ndim == 2 else pixels  # grey into R, G, B
        return stacked


def _split_folder(folder: Path, split: str) -> Path:
    if not (folder / split).is_dir():
        raise DataError(f"{folder} has no {split}/ folder; format 'folder' expects {LAYOUT}.")
    return folder / split


def _visible(folder: Path) -> list[Path]:
    """Entries in name order, without hidden ones: .DS_Store, and macOS's ._name.png files, which are not images."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(class_dir: Path) -> list[Path]:
    if not class_dir.is_dir():
        return []  # test/ may lack a class
    return [p for p in _visible(class_dir) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
