"""The timer: medians of several repeats, warm-up excluded, inputs rotated so caches do not flatter,
the variants of a case interleaved so that a drifting machine slows them alike.

Equivalent in spirit to::

    for name, fn in variants: [fn(x) for x in inputs[:warmup]]   # not timed
    for r in range(repeats):                                       # round robin, order rotated by r
        for name, fn in rotate(variants, r): times[name].append(time(fn(next_input())))
    {name: median(t) for name, t in times.items()}

On CUDA the time comes from CUDA events around a batch of back-to-back calls (launches are
asynchronous, so a host clock would time the launch, not the kernel); on the CPU from
``time.perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Sequence, Tuple

import torch

# Inputs are rotated over at least this many bytes: more than the largest L2 (H100: 50 MB, H200:
# 60 MB) or CPU last-level cache we expect, so each call reads its input from DRAM as it would
# inside a model, not from a cache warmed by the previous call.
ROTATION_BYTES = 128 * 2**20
MIN_INPUTS, MAX_INPUTS = 2, 64

# On CUDA a repeat is a batch of calls lasting at least this long: a single small kernel (~10 us)
# is close to the event resolution and launch jitter. On the CPU one call is already milliseconds.
CUDA_MIN_REPEAT_S = 2e-3


@dataclass
class Timing:
    """Seconds per call: one figure per repeat (each the mean over ``calls_per_repeat`` calls)."""

    per_call_s: List[float]
    calls_per_repeat: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    def quartiles_s(self):
        """(first, third) quartile; with fewer than 2 repeats both are the single value."""
        if len(self.per_call_s) < 2:
            return self.per_call_s[0], self.per_call_s[0]
        q1, _, q3 = statistics.quantiles(self.per_call_s, n=4, method="inclusive")
        return q1, q3

    def as_dict(self) -> dict:
        q1, q3 = self.quartiles_s()
        ms = 1e3
        return {"median_ms": self.median_s * ms, "q1_ms": q1 * ms, "q3_ms": q3 * ms,
                "min_ms": min(self.per_call_s) * ms, "max_ms": max(self.per_call_s) * ms,
                "repeats": len(self.per_call_s), "calls_per_repeat": self.calls_per_repeat}


# The speed probe: a fixed float32 GEMM, 2 * 512^3 FLOP (~2 ms on 2 cores of the CI machine).
PROBE_SIZE, PROBE_CALLS = 512, 5


def probe_gemm_name(device: torch.device) -> str:
    """Which GEMM :func:`machine_speed_gflops` times: the one the package's CPU Linears take."""
    if device.type != "cpu":
        return "torch.mm"
    from .. import memory

    return "oneDNN inner product" if memory.onednn_gemm() else "torch.mm"


def machine_speed_gflops(device: torch.device) -> float:
    """GFLOP/s of a fixed float32 GEMM right now (the best of a few calls). Taken before and after
    each case: on a shared machine whose speed drifts (the CI VM's model timings moved up to 2x
    within minutes), a drop between the two marks a case measured in a slow spell. On the CPU it is
    the GEMM the package's Linears run on (:func:`probe_gemm_name`): on an AVX-512 AMD CPU oneDNN's
    runs twice as fast as torch.mm's MKL, and the GEMM floor must not sit above what ours reaches."""
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device)
    b, out = torch.randn_like(a), torch.empty_like(a)
    if probe_gemm_name(device) == "torch.mm":
        def gemm():
            torch.mm(a, b, out=out)
    else:
        def gemm():  # a @ b.T: the same work
            torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    gemm()  # warm-up: allocations, thread pool, cuBLAS handle
    best = math.inf
    for _ in range(PROBE_CALLS):
        _synchronize(device)
        start = time.perf_counter()
        gemm()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * PROBE_SIZE ** 3 / best / 1e9


def rotation_count(input_bytes: int) -> int:
    """How many distinct inputs to pre-generate so that together they span ``ROTATION_BYTES``."""
    return max(MIN_INPUTS, min(MAX_INPUTS, math.ceil(ROTATION_BYTES / max(1, input_bytes))))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(fn: Callable, inputs: Sequence, start: int, calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` back-to-back calls, taking inputs round-robin from index ``start``."""
    n = len(inputs)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(calls):
            fn(inputs[(start + i) % n])
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[(start + i) % n])
    return time.perf_counter() - t0


def measure_round_robin(variants: Dict[str, Tuple[Callable, Callable[[], ContextManager]]], inputs: Sequence,
                        device: torch.device, warmup: int = 3,
                        repeats: int = 10) -> Tuple[Dict[str, Timing], Dict[str, Exception]]:
    """Time ``fn(x)`` of every variant for ``x`` rotating through ``inputs``, their repeats interleaved:
    repeat r times every variant once, in an order rotated by r. A machine whose speed drifts between runs (a shared VM:
    the same model's eager time moved 2x within minutes on the CI machine) then slows every variant
    alike, and the ratios between them stay meaningful. ``variants`` maps a name to (fn, context
    factory): each batch of calls runs inside a fresh ``context()``. Returns the timings and, for
    variants that raised, the exception (those are dropped from the remaining rounds)."""
    if not inputs:
        raise ValueError("measure_round_robin: inputs is empty; pass at least one input tensor")
    if repeats < 1:
        raise ValueError(f"measure_round_robin: repeats must be >= 1, got {repeats}")
    failed: Dict[str, Exception] = {}
    calls, per_call = {}, {}
    position = max(1, warmup)

    def batch(name: str, start: int, n: int) -> float:
        fn, context = variants[name]
        with context():
            return _time_batch(fn, inputs, start, n, device)

    for name in variants:
        try:
            _synchronize(device)
            warm_s = [batch(name, i, 1) for i in range(max(1, warmup))]
        except Exception as e:  # noqa: BLE001 - reported per variant by the caller
            failed[name] = e
            continue
        calls[name] = max(1, math.ceil(CUDA_MIN_REPEAT_S / max(min(warm_s), 1e-7))) if device.type == "cuda" else 1
        per_call[name] = []
    for r in range(repeats):
        names = [n for n in per_call if n not in failed]
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            try:
                per_call[name].append(batch(name, position, calls[name]) / calls[name])
            except Exception as e:  # noqa: BLE001
                failed[name] = e
        position += 1
    timings = {name: Timing(times, calls[name]) for name, times in per_call.items() if name not in failed}
    return timings, failed


__all__ = ["Timing", "measure_round_robin", "rotation_count", "ROTATION_BYTES"]
