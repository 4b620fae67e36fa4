"""The timing protocol every latency in kdtune follows, whatever runs the student (eager PyTorch in the size
front, ONNX Runtime where it ships): untimed warm-up calls, then timed calls, reported as their median and
95th percentile."""

from __future__ import annotations

from time import perf_counter
from typing import Callable

import numpy as np

BATCH_SIZES = (1, 256)
N_WARMUP_CALLS = 5  # first calls allocate buffers and pick kernels
N_TIMED_CALLS = 20


def time_calls(call: Callable, make_input: Callable[[int], object], *, batch_sizes: tuple[int, ...] = BATCH_SIZES,
               n_warmup_calls: int = N_WARMUP_CALLS, n_calls: int = N_TIMED_CALLS) -> dict[int, dict]:
    """{batch size: {"median_ms", "p95_ms", "n_calls"}} of `call(make_input(batch))`, called
    `n_warmup_calls` times untimed, then `n_calls` times timed, at each batch size."""
    assert n_calls >= 1, f"{n_calls=}"
    found = {}
    for batch in batch_sizes:
        x = make_input(batch)
        for _ in range(n_warmup_calls):
            call(x)
        milliseconds = []
        for _ in range(n_calls):
            started = perf_counter()
            call(x)
            milliseconds.append(1000 * (perf_counter() - started))
        found[batch] = {"median_ms": round(float(np.median(milliseconds)), 4),
                        "p95_ms": round(float(np.percentile(milliseconds, 95)), 4), "n_calls": n_calls}
    return found
