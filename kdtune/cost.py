"""What a student costs to run: multiply-adds per image, and its CPU inference latency, measured once per machine.

Latency is measured, not modelled: eager PyTorch on the CPU (`model.eval()`, `torch.inference_mode()`, fp32,
Python overhead included, as a user serving the student runs it), at batch 1 and batch 256, `N_TIMED_CALLS`
timed calls after `N_WARMUP_CALLS` untimed ones, reported as the median and the 95th percentile. Always fp32,
whatever precision the study trains in: the number then means the same in every study on a machine, and bf16
autocast is a training choice that on CPUs without native bf16 would time PyTorch's emulation, not the student.

The medians are only as quiet as the machine. Another process on the same cores (a second `--jobs` worker
training, a CI job) slows the calls it overlaps, and a median of 20 hides that only when the overlap is short.
A measurement is cached per (family, depth, width, input, classes, torch threads, CPU model and flags, torch version)
in `studies/.cost-cache/`, so a noisy one stays until that file is deleted.

ONNX Runtime, where a student ships (kdtune.runtime), is timed by the same protocol on the exported graph when
asked: a spec's `onnxruntime_latency = true` for every trial (off by default: exporting costs about 0.7 s per
new width, a third more on the quickstart's first study), and the report's band winners whenever kdtune[export]
is installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from kdtune import hardware, runtime
from kdtune.counting import multiply_adds
from kdtune.student import Architecture
from kdtune.timing import BATCH_SIZES, N_TIMED_CALLS, N_WARMUP_CALLS, time_calls

CACHE_ROOT = Path("studies/.cost-cache")
# how a trial's and a report's latency keys end, by runtime: latency_ms_batch1, latency_ms_batch1_onnxruntime
LATENCY_SUFFIX = {"pytorch": "", "onnxruntime": "_onnxruntime"}
def latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_sizes: tuple[int, ...] = BATCH_SIZES,
            n_warmup_calls: int = N_WARMUP_CALLS, n_calls: int = N_TIMED_CALLS) -> dict[int, dict]:
    """{batch size: {"median_ms", "p95_ms", "n_calls"}} of `model` on the CPU, over `n_calls` timed calls that
    follow `n_warmup_calls` untimed ones, with the torch threads set now."""
    model = model.to("cpu").eval()
    with torch.inference_mode():
        return time_calls(model, lambda batch: torch.rand(batch, *input_shape,
                                                          generator=torch.Generator().manual_seed(0)),
                          batch_sizes=batch_sizes, n_warmup_calls=n_warmup_calls, n_calls=n_calls)


def measure(architecture: Architecture, width: int, runtime_name: str = "pytorch") -> dict:
    """Multiply-adds and latency of the student of this architecture and width, with random weights (a dense model's
    time does not depend on their values), in eager PyTorch or, exported as it ships, in ONNX Runtime; the
    global RNG, which seeds the next student, is left alone."""
    with torch.random.fork_rng(devices=[]):
        model = architecture.build(width).eval()  # only ever runs inference
    shape = architecture.input_shape
    if runtime_name == "pytorch":
        timed = latency(model, shape)
    else:
        with tempfile.TemporaryDirectory() as folder:
            runtime.to_onnx(model, shape, Path(folder) / "student.onnx")
            timed = runtime.latency(runtime.session(Path(folder) / "student.onnx"), shape)
    return {"multiply_adds": multiply_adds(model, shape),
            "latency": {str(batch): found for batch, found in timed.items()}}


def of_student(architecture: Architecture, width: int, onnxruntime: bool = False) -> dict:
    """What a trial records of its student's cost: `multiply_adds` per image, the median latency at each
    batch size (`latency_ms_batch1`, `latency_ms_batch256`), the torch threads and the CPU it was timed on;
    with `onnxruntime`, also the latency of the student exported as it ships, in ONNX Runtime
    (`latency_ms_batch1_onnxruntime`, ...; about 0.7 s to export each new width). Measured once per width and
    machine, then read from the cache."""
    found = {}
    for runtime_name in ("pytorch", "onnxruntime")[:1 + onnxruntime]:
        key = cache_key(architecture, width, runtime_name)
        path = CACHE_ROOT / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
        measured = read_cached(path, key)
        if measured is None:
            measured = measure(architecture, width, runtime_name)
            write_cached(path, {"key": key, **measured, "cpu_flags": hardware.reported_cpu_flags(),
                                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        found.update({f"latency_ms_batch{batch}{LATENCY_SUFFIX[runtime_name]}":
                      measured["latency"][str(batch)]["median_ms"] for batch in BATCH_SIZES})
        found["multiply_adds"] = measured["multiply_adds"]
    return {**found, "latency_threads": torch.get_num_threads(), "latency_cpu": hardware.cpu_model()}


def cache_key(architecture: Architecture, width: int, runtime_name: str = "pytorch") -> dict:
    """Everything a measurement depends on: the student, the machine (a VM's model name is often only a
    family, so its feature flags too), torch's threads and version, the runtime and how it was timed."""
    flags = " ".join(sorted(hardware.cpu_flags()))
    student = architecture.as_record()
    if (student["family"], student["depth"], student["input_shape"][0]) == ("mlp", 1, 1) and \
            len(student["input_shape"]) == 3:  # grey one-layer MLPs keep the key they had before other students
        student = {"family": "mlp", "image_shape": student["input_shape"][1:], "n_classes": student["n_classes"]}
    key = {**student, "width": width, "threads": torch.get_num_threads(), "cpu": hardware.cpu_model(),
           "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__,
           "batch_sizes": list(BATCH_SIZES), "n_warmup_calls": N_WARMUP_CALLS, "n_calls": N_TIMED_CALLS}
    # a PyTorch measurement keeps the key it had before ONNX Runtime was timed: caches stay valid
    return key if runtime_name == "pytorch" else {**key, "runtime": runtime_name,
                                                  "onnxruntime": importlib.metadata.version("onnxruntime")}


def read_cached(path: Path, key: dict) -> dict | None:
    """The cached measurement for `key`; None when there is none or the file is unreadable, cut short or
    holds another key (it is then measured again and rewritten)."""
    try:
        cached = json.loads(path.read_text())
        if cached["key"] != key:
            return None
        return {"multiply_adds": int(cached["multiply_adds"]),
                "latency": {str(b): {"median_ms": float(cached["latency"][str(b)]["median_ms"])} for b in BATCH_SIZES}}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path, record: dict) -> None:
    """Write to a scratch file, then rename: a reader never sees half a file, and workers measuring the same
    width at once each write a whole one. A cache that cannot be written costs a measurement per trial, not
    the trial: it warns instead."""
    scratch = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(json.dumps(record, indent=2))
        os.replace(scratch, path)
    except OSError as error:
        warnings.warn(f"cannot write the student cost cache in {path.parent} ({error.strerror}): latency is "
                      "measured again for every trial.", stacklevel=2)
