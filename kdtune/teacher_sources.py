"""Where a teacher comes from: the built-in CNN or a user's network, trained here or given as weights, or only
its logits, from a file (another framework, a service: anything that yields logits).

Everything after the teacher reads only its cached logits, so a teacher can be anything. What identifies each
source enters the teacher's cache key: the network (for user code, its module's source), the weights' sha256,
the logits file's sha256.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtune import user_code
from kdtune.data import Splits
from kdtune.models import TeacherCNN
from kdtune.provenance import sha256_file
from kdtune.readers import DataError
from kdtune.spec import TeacherSpec

LOGITS_KEYS = ("train", "test")


def identity(source: TeacherSpec) -> dict:
    """What the cache key must hold to tell this teacher from any other, besides the training schedule."""
    found = {"architecture": TeacherCNN.__name__ if source.model == "builtin" else source.model}
    if user_code.is_reference(source.model):
        found["source_sha256"] = user_code.source_sha256(source.model, "teacher.model")
    for key in ("weights", "logits"):
        if getattr(source, key):
            found[f"{key}_sha256"] = sha256_file(_existing(getattr(source, key), key))
    return found


def network(source: TeacherSpec, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The teacher's network with fresh weights: the built-in CNN, or the user's factory(input_shape, n_classes)."""
    if source.model == "builtin":
        return TeacherCNN(input_shape, n_classes)
    model = user_code.build(source.model, "teacher.model", tuple(input_shape), n_classes)
    user_code.check_output(model, input_shape, n_classes, source.model, "teacher.model")
    return model


def load_weights(model: nn.Module, path: Path | str, key: str = "teacher.weights") -> nn.Module:
    """`model` with the state_dict saved at `path` (read with weights_only=True: no pickled code runs)."""
    path = _existing(path, key)
    refused = f"{key} = {str(path)!r} is not a state_dict of this teacher network"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:  # what weights_only makes of a whole pickled module
        raise DataError(f"{refused} (it holds pickled objects other than tensors, or is no file torch.save "
                        "wrote); save it with torch.save(model.state_dict(), path), not torch.save(model, path).") \
            from error
    # a file torch.save did not write fails in its unpickler with any of these
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError,
            zipfile.BadZipFile) as error:
        raise DataError(f"{refused} ({_first_line(error)}); save it with torch.save(model.state_dict(), "
                        "path).") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DataError(f"{refused} (it holds a {type(state).__name__}, not a dict of tensors); save it with "
                        "torch.save(model.state_dict(), path).")
    if differences := _differences(state, model.state_dict()):
        # another network's weights: load_state_dict would list every tensor on lines of their own
        remedy = ("give the weights of the network teacher.model builds for this data, or leave teacher.weights "
                  "out to train the teacher here" if key == "teacher.weights" else
                  "retrain it with `kdtune teacher --force`")
        raise DataError(f"{refused} but another network's ({differences}); {remedy}.")
    model.load_state_dict(state)
    return model


def _differences(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """How the tensors of a state_dict differ from a network's: the first of each kind and how many."""
    def listed(names: list[str], what: str) -> list[str]:
        return [f"{len(names)} {what} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"] if names else []
    reshaped = [f"{name} is {tuple(found[name].shape)} in the file but {tuple(expected[name].shape)} here"
                for name in expected if name in found and found[name].shape != expected[name].shape]
    return "; ".join(reshaped[:1] + [f"{len(reshaped) - 1} more of other shapes"] * (len(reshaped) > 1)
                     + listed([name for name in expected if name not in found], "missing")
                     + listed([name for name in found if name not in expected], "not in this network"))


def _first_line(error: BaseException) -> str:
    """The error's kind and its message's first line: a KeyError's message alone is a bare number."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def read_logits(path: Path | str, splits: Splits) -> dict[str, torch.Tensor]:
    """The logits file's "train" rows split as the data was (train, val) and its "test" rows, as float32."""
    path = _existing(path, "teacher.logits")
    remedy = "save it with numpy.savez(path, train=<(N_train, C) logits>, test=<(N_test, C) logits>)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"teacher.logits {path} holds one array, as a .npy file does, not an .npz archive; "
                            f"{remedy}.")
        with loaded as archive:
            missing = [key for key in LOGITS_KEYS if key not in archive.files]
            if missing:
                raise DataError(f"teacher.logits {path} lacks {missing}; {remedy}.")
            arrays = {key: archive[key] for key in LOGITS_KEYS}
    except (ValueError, OSError, EOFError, AttributeError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"teacher.logits {path} is not a readable .npz archive ({error}); {remedy}.") from error
    n_rows = {"train": len(splits.train_rows) + len(splits.val_rows), "test": len(splits.x_test)}
    for key, values in arrays.items():
        if values.ndim != 2 or values.dtype.kind != "f" or values.shape != (n_rows[key], splits.n_classes):
            raise DataError(f"teacher.logits {path}: {key} must be float logits of shape ({n_rows[key]}, "
                            f"{splits.n_classes}), one row per {key} sample of the data in file order and one column "
                            f"per class, but got {values.dtype} {values.shape}.")
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
            raise DataError(f"teacher.logits {path}: {key} row {row} holds NaN or infinity; export the logits again.")
    train = torch.from_numpy(arrays["train"].astype(np.float32))
    return {"train": train[torch.from_numpy(splits.train_rows)], "val": train[torch.from_numpy(splits.val_rows)],
            "test": torch.from_numpy(arrays["test"].astype(np.float32))}


def write_logits(logits: dict[str, torch.Tensor], splits: Splits, path: Path | str) -> None:
    """A teacher's logits as `read_logits` reads them: the train and val rows back in the training file's order."""
    train = np.empty((len(splits.train_rows) + len(splits.val_rows), splits.n_classes), dtype=np.float32)
    train[splits.train_rows], train[splits.val_rows] = logits["train"].numpy(), logits["val"].numpy()
    np.savez(path, train=train, test=logits["test"].numpy())


def _existing(path: Path | str, key: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher.{key.removeprefix('teacher.')} file {path} does not exist; check the path in the "
                        "spec's [teacher] section.")
    return path
