"""The student as it ships: an ONNX graph that takes the samples as the user holds them, run by ONNX Runtime, and
its latency there.

PyTorch's path to ONNX is `torch.export` then `torch.onnx.export(..., dynamo=True)` (TorchScript is deprecated).
The graph starts with kdtune's own preprocessing (`data.model_inputs`: uint8 -> float32 / 255, the channel axis
first), so a user feeds the images as they are, uint8 (N, H, W) or (N, H, W, 3), or float32 feature vectors
(N, D), with any N. For models this small, framework overhead
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


class FromRaw(nn.Module):
    """A student behind kdtune's preprocessing: samples as the user holds them in, logits (N, classes) out."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(data.model_inputs(images))


def to_onnx(student: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Write `student` (on the CPU, fp32), which takes `input_shape`, as an ONNX graph with a dynamic batch
    axis to `path`."""
    model = FromRaw(student).to("cpu").eval()
    example = torch.from_numpy(np.zeros((2, *data.raw_shape(input_shape)), dtype=data.raw_dtype(input_shape)))
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


def logits(model_session, samples: np.ndarray) -> np.ndarray:
    """Logits (N, classes) for samples as the graph takes them (see `data.raw_shape` and `data.raw_dtype`)."""
    return model_session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(samples)})[0]


def latency(model_session, input_shape: tuple[int, ...]) -> dict[int, dict]:
    """{batch size: {"median_ms", "p95_ms", "n_calls"}} of the session, by kdtune's timing protocol
    (kdtune.timing), on random samples as the graph takes them."""
    rng = np.random.default_rng(0)
    shape, dtype = data.raw_shape(input_shape), data.raw_dtype(input_shape)

    def samples(batch: int) -> np.ndarray:
        if dtype == np.uint8:
            return rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        return rng.standard_normal((batch, *shape), dtype=np.float32)

    return time_calls(lambda batch: logits(model_session, batch), samples)
