"""`kdtune predict`: an exported student on new images, through ONNX Runtime, the runtime it ships in.

Images come as an .npz (`images`, optionally `labels`; or kdtune's own `x_test`/`y_test`), an .npy of images,
or one image file (PNG, JPEG, ... read with Pillow, as grey or colour as the student was trained; 16-bit grey
scaled to 8 bits by its bit depth, as image folders are). They must be uint8 pixels of the size the student was
trained on, oriented as kdtune read its training images; channels on the last axis or the second, as training
takes them. A student of feature vectors takes float vectors (N, D) from an .npz or .npy.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np

from kdtune import data, export, image_folder, runtime
from kdtune.readers import DataError
from kdtune.spec import SpecError

# (images, labels) keys an .npz may use: its own, or the test split of a dataset in kdtune's npz format
NPZ_KEYS = (("images", "labels"), ("x_test", "y_test"))


def read_images(path: Path, colour: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples and their labels where the file has them; an image file is read as RGB with `colour`."""
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; give an .npz, an .npy or an image file.")
    suffix = path.suffix.lower()  # IMAGES.NPZ is an .npz, as Windows and some cameras' tools name files
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except (ValueError, EOFError, OSError) as error:
            raise DataError(f"{path} is not a readable .npy file ({error}).") from error
    try:
        import PIL  # noqa: F401 (read_image imports it where it decodes; here only to say how to install it)
    except ImportError:
        raise SpecError(f"reading the image file {path} needs Pillow: {runtime.INSTALL_HINT}") from None
    return image_folder.read_image(path, colour, remedy="give a PNG or JPEG, or an .npz or .npy of images")[None], None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            for images, labels in NPZ_KEYS:
                if images in archive.files:
                    return archive[images], archive[labels] if labels in archive.files else None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable .npz archive ({error}).") from error
    raise DataError(f"{path} has no array named 'images' (or 'x_test'); save the images with "
                    "numpy.savez(path, images=..., labels=...).")


def check_samples(samples: np.ndarray, input_shape: tuple[int, ...], where: Path) -> np.ndarray:
    """A batch of samples as the student takes them (`data.raw_shape`, `data.raw_dtype`); one sample becomes a
    batch of one. Feature vectors of any float or integer dtype are taken as float32."""
    shape, dtype = data.raw_shape(input_shape), data.raw_dtype(input_shape)
    given = samples.shape
    if dtype == np.uint8 and samples.ndim == 4:  # a batch as the user gave it; one image has its channels last
        samples = _channels_as_held(samples, input_shape)
    if samples.ndim == len(shape):
        samples = samples[None]
    if dtype == np.uint8 and samples.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 pixels 0..255, as in training, but are {samples.dtype}.")
    if dtype != np.uint8 and samples.dtype.kind not in "fiu":
        raise DataError(f"{where}: feature vectors must be numbers, but are {samples.dtype}.")
    if tuple(samples.shape[1:]) != shape or len(samples) == 0:
        also = f" or (N, {', '.join(map(str, input_shape))})" if len(input_shape) == 3 else ""
        raise DataError(f"{where}: samples must be (N, {', '.join(map(str, shape))}){also} with N >= 1 for this "
                        f"student, but are {given}.")
    return samples.astype(dtype, copy=False)


def check_labels(labels: np.ndarray, n_images: int, n_classes: int, where: Path) -> np.ndarray:
    """The file's labels as class numbers, checked as training checks its own: a label that is no class of the
    student would only count as a wrong prediction, and the accuracy would be quietly low."""
    labels = data.class_numbers(labels, str(where), "labels")
    if len(labels) != n_images:
        raise DataError(f"{where} has {n_images} images but {len(labels)} labels.")
    data.check_classes(labels, n_classes, str(where), "label", "the student was trained on",
                       f"give each image's class number 0..{n_classes - 1}, or leave the labels out")
    return labels


def _channels_as_held(images: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """A batch of images whose channels come second, (N, C, H, W), or last and single, (N, H, W, 1), as training
    takes them, in the layout the student's graph takes: matched on the student's own shape, so that three grey
    images are never read as one colour image. Anything else is left for the shape check to refuse."""
    channels, height, width = input_shape
    if images.shape[1:] == (channels, height, width) and images.shape[1:] != (height, width, channels):
        images = np.moveaxis(images, 1, 3)
    return images[..., 0] if channels == 1 and images.shape[3] == 1 else images


def predict(folder: Path, path: Path, threads: int | None = None) -> dict:
    """Predicted classes and their probabilities for the images in `path`, by the student exported to
    `folder`; with labels in the file, the accuracy too."""
    runtime.require("kdtune predict")
    try:
        described = json.loads((folder / export.CONFIG).read_text())
        architecture = export.architecture_of(described)
    except FileNotFoundError:
        raise SpecError(f"{folder} holds no exported student ({export.CONFIG} is missing); run `kdtune export` "
                        "and pass its folder to --model.") from None
    except (ValueError, KeyError, TypeError) as error:
        raise SpecError(f"{folder / export.CONFIG} is damaged ({type(error).__name__}); run `kdtune export` "
                        "again.") from error
    input_shape = architecture.input_shape
    images, labels = read_images(path, colour=len(input_shape) == 3 and input_shape[0] == 3)
    images = check_samples(images, input_shape, path)
    if labels is not None:
        labels = check_labels(labels, len(images), architecture.n_classes, path)
    logits = runtime.logits(runtime.session(folder / export.ONNX, threads), images)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # softmax, without overflow
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    found = {"n_images": len(images), "predicted": predicted.tolist(), "probabilities": probabilities.tolist(),
             "class_names": described.get("class_names")}
    if labels is not None:
        found["accuracy"] = float((predicted == labels).mean())
    return found


def write_csv(found: dict, path: Path) -> None:
    """One row per image: its index, the predicted class and the probability of each class."""
    n_classes = len(found["probabilities"][0])
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        names = found["class_names"]
        writer.writerow(["image", "predicted", *(["class_name"] if names else []),
                         *(f"p{c}" for c in range(n_classes))])
        for index, (label, probs) in enumerate(zip(found["predicted"], found["probabilities"])):
            writer.writerow([index, label, *([names[label]] if names else []), *(f"{p:.6f}" for p in probs)])
