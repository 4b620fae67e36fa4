"""The student as it ships: an ONNX graph that takes uint8 pixels, run by ONNX Runtime, and its latency there.

PyTorch's path to ONNX is `torch.export` then `torch.onnx.export(..., dynamo=True)` (TorchScript is deprecated).
The graph starts with kdtune's own preprocessing (`data.model_inputs`: uint8 -> float32 / 255, a channel axis),
so a user feeds the images as they are, (N, H, W) uint8, with any N. For models this small, framework overhead
decides latency: measured in the runtime that ships, not modelled from PyTorch's.

Needs kdtune[export] (onnx, onnxscript, onnxruntime); everything else in kdtune works without it.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtune import data
from kdtune.spec import SpecError
from kdtune.timing import time_calls

INSTALL_HINT = 'pip install "kdtune[export]"'
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def missing_packages() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def require(what: str) -> None:
    """One line naming what is missing and how to get it, for a command that needs the export extra."""
    if lacking := missing_packages():
        raise SpecError(f"{what} needs {', '.join(lacking)}: {INSTALL_HINT}")


class FromPixels(nn.Module):
    """A student behind kdtune's preprocessing: uint8 pixels (N, H, W) in, logits (N, classes) out."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(data.model_inputs(images))


def to_onnx(student: nn.Module, image_shape: tuple[int, int], path: Path) -> None:
    """Write `student` (on the CPU, fp32) as an ONNX graph with a dynamic batch axis to `path`."""
    model = FromPixels(student).to("cpu").eval()
    example = torch.zeros(2, *image_shape, dtype=torch.uint8)
    # the exporter logs and warns about torchvision operators it skips and its own internals: not the user's
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], verbose=False,
                                        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}})
    finally:
        exporter_log.setLevel(level)
    program.save(str(path))


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU with `threads` intra-op threads (default: torch's, so that the two
    runtimes are timed alike)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types, not OSError or ValueError
        raise SpecError(f"{path} is not a model ONNX Runtime can load ({' '.join(str(error).split())[:200]}); "
                        "export it again with `kdtune export`.") from error


def logits(model_session, images: np.ndarray) -> np.ndarray:
    """Logits (N, classes) for uint8 images (N, H, W)."""
    return model_session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})[0]


def latency(model_session, image_shape: tuple[int, int]) -> dict[int, dict]:
    """{batch size: {"median_ms", "p95_ms", "n_calls"}} of the session, by kdtune's timing protocol
    (kdtune.timing), on uint8 images."""
    rng = np.random.default_rng(0)
    return time_calls(lambda images: logits(model_session, images),
                           lambda batch: rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8))
