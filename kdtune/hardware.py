"""What this machine runs fast: the device, whether it has native bf16, the precision to train in, torch threads.

bf16 pays only where the hardware multiplies bf16 natively (AVX-512 BF16 or AMX on x86 CPUs, Ampere and later
GPUs). On a CPU with AVX2 only, PyTorch emulates it: a bf16 matmul measured 1.4 GFLOP/s against fp32's ~160 on
this project's 2-core machine, so `auto` must never pick it there.

Where bf16 is native it still does not pay for every model. A narrow student's training step is bound by
per-operation dispatch, not by its matmuls, and autocast adds a cast per weight per step. On a 2-core Zen 4
(avx512_bf16, 1 and 2 threads; bench/results/zen4-*-20261129.json), over several runs each, bf16 ran one-layer MLP
students of width 16 at 0.72-0.97x fp32's speed, width 64 at 0.72-1.33x and width 128 at 0.97-1.36x: noise
around 1, sometimes slower. From width 256 it was faster in every run (1.12-1.62x), 512 at 1.3-1.8x, 2048 at
1.6-1.8x, the teacher CNN at 1.65-1.8x; small CNN students at 88-128 k multiply-adds at 1.00x, one at 1.03 M at
1.42x. So `auto` trains a student in bf16 only from `AUTO_BF16_MIN_MULTIPLY_ADDS` multiply-adds per input (a
one-layer MLP on 28 x 28 images of width 256 has 203,264), and the teacher, the large model of the pair,
always.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kdtune.spec import SpecError

# /proc/cpuinfo flags of x86 CPUs that multiply bf16 in hardware.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# `auto` trains students with fewer multiply-adds per input than this in fp32 (see the module's docstring)
AUTO_BF16_MIN_MULTIPLY_ADDS = 200_000
# The flags worth printing beside a timing: they decide which kernels PyTorch can use.
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Compute:
    """Where tensors live and what autocast runs: `autocast_dtype` None means plain fp32. `by_student_size`
    (`auto` where bf16 is native): a student runs `autocast_dtype` only if large enough, see `for_student`."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    by_student_size: bool = False

    @property
    def precision(self) -> str:
        """What the teacher, and every student unless `by_student_size`, trains in."""
        return "fp32" if self.autocast_dtype is None else "bf16"

    @property
    def policy(self) -> str:
        """The precision, as a study records it: students may differ when `by_student_size`."""
        if self.by_student_size:
            return f"bf16 from {AUTO_BF16_MIN_MULTIPLY_ADDS:,} multiply-adds per input, fp32 below"
        return self.precision

    def for_student(self, multiply_adds: int | None) -> Compute:
        """What a student of `multiply_adds` per input trains in. One not counted (None: a user's family with
        layers kdtune cannot count) trains in fp32: without a count there is no telling whether bf16 pays, and on
        a narrow model it costs (see `Architecture.compute_for`, which says so once)."""
        if not self.by_student_size:
            return self
        pays = multiply_adds is not None and multiply_adds >= AUTO_BF16_MIN_MULTIPLY_ADDS
        return Compute(self.device, self.autocast_dtype if pays else None)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; nothing at all for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA GPU when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device={name!r} but no CUDA GPU is visible; use device = \"auto\" or \"cpu\".")
    return torch.device(name)


def resolve_compute(device_name: str, precision: str) -> Compute:
    """fp32 always runs fp32; bf16 always runs bf16 (warning once where it is emulated); auto runs bf16 only
    where the hardware has it natively, and there for the teacher and students large enough to gain by it."""
    device = resolve_device(device_name)
    if precision == "fp32":
        return Compute(device)
    native = has_native_bf16(device)
    if precision == "bf16" and not native:
        _warn_emulated_bf16(str(device))
    if precision == "bf16":
        return Compute(device, torch.bfloat16)
    return Compute(device, torch.bfloat16, by_student_size=True) if native else Compute(device)


def has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's name as Linux reports it ("model name" in /proc/cpuinfo); elsewhere what `platform` knows.
    Virtual machines often report a family only ("AMD EPYC"): `cpu_flags` tells such machines apart."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def reported_cpu_flags() -> list[str]:
    """Which of the flags that decide kdtune's speed this CPU has, for benchmark records."""
    return sorted(flag for flag in REPORTED_CPU_FLAGS if flag in cpu_flags())


@functools.cache
def _warn_emulated_bf16(device: str) -> None:
    warnings.warn(f"precision = \"bf16\" on {device}, which has no native bf16 (found none of "
                  f"{', '.join(NATIVE_BF16_CPU_FLAGS)}): PyTorch emulates it, far slower than fp32. "
                  "Use precision = \"auto\" or \"fp32\".", stacklevel=3)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers).

    torch's own default is the machine's physical core count, which oversubscribes a container that sees
    64 cores but may use 2.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def configure_threads(n_threads: int | None = None) -> int:
    """Give torch `n_threads` intra-op threads (default: one per usable CPU) and one inter-op thread: kdtune
    runs one model at a time per process, so inter-op threads would only idle. Returns the intra-op count."""
    n_threads = n_threads or available_cpus()
    torch.set_num_threads(n_threads)
    with contextlib.suppress(RuntimeError):  # torch allows it only before its first parallel work
        torch.set_num_interop_threads(1)
    return n_threads
