"""Runs one case of a registered benchmark: builds every variant, checks it, times it, makes rows.

Variants of a case (the same for every registry entry):

- ``eager``: the module users run today, cast to the dtype, ``eval()`` + ``torch.inference_mode()``;
- the entry's extra eager baselines (for dwconv_bn_act: ``eager-folded``);
- ``torch.compile``: of the eager module (compiled before timing; skipped with the reason when
  compilation fails, e.g. no C++ compiler);
- ``fused-<backend>``: our fused module, under ``fastvit_kernels.use_backend(backend)``;
  ``fused-auto``: with no preference, each op call taking the first backend of the device's default
  order that serves it (the way users run it: e.g. T2T-ViT's 147-wide heads go to the reference).

Every variant's output on the first input is compared with the eager module run in float64 on that
input before anything is timed, so no speed is reported without its error (see ``accuracy``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends, use_backend
from .accuracy import max_abs_error, tolerance
from .cases import Benchmark, Case
from .timing import Timing, measure_round_robin, rotation_count

EAGER = "eager"
COMPILED = "torch.compile"
BASELINE, FUSED = "baseline", "fused"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# (untimed warm-up calls, timed repeats) per variant; quick is a smoke run of under a minute on two
# CPU cores.
FULL_SETTINGS, QUICK_SETTINGS = (3, 20), (1, 5)


def settings_for(benchmark: Benchmark, quick: bool, warmup: Optional[int] = None,
                 repeats: Optional[int] = None) -> Tuple[int, int]:
    """(warm-up calls, timed repeats) for ``benchmark``: the values asked for, else the default of the
    run (full or quick), lowered to the entry's own ``warmup`` / ``repeats`` hint when it has one."""
    default_warmup, default_repeats = QUICK_SETTINGS if quick else FULL_SETTINGS
    if benchmark.warmup is not None:
        default_warmup = min(default_warmup, benchmark.warmup)
    if benchmark.repeats is not None:
        default_repeats = min(default_repeats, benchmark.repeats)
    return warmup or default_warmup, repeats or default_repeats


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_dtypes(device: torch.device) -> List[str]:
    # Half precision on the CPU is not what anyone deploys and eager PyTorch is slow at it.
    return ["float16", "bfloat16", "float32"] if device.type == "cuda" else ["float32"]


def dtype_problem(name: str, device: torch.device) -> Optional[str]:
    """None when dtype ``name`` can be benchmarked on ``device``, else why not. The CPU runs all three
    (the C++ kernels and eager PyTorch accept float16 and bfloat16, slowly)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if name == "bfloat16" and major < 8:
            return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no "
                    "bfloat16 arithmetic; it needs 8.0 (Ampere) or newer")
    return None


def case_batch(case: Case) -> Optional[int]:
    """The batch size of a case: its ``batch`` param, or the N of an NCHW ``shape``; None if neither."""
    if "batch" in case.params:
        return int(case.params["batch"])
    shape = case.params.get("shape")
    return int(shape[0]) if shape else None


def select_cases(benchmark: Benchmark, quick: bool, device: torch.device,
                 batches: Optional[Sequence[int]] = None) -> List[Case]:
    """The entry's cases for the run, keeping only the batch sizes in ``batches`` when given (cases
    with no batch size are kept)."""
    cases = benchmark.cases(quick, device)
    if batches:
        cases = [c for c in cases if case_batch(c) is None or case_batch(c) in batches]
    return cases


# Not a backend: the fused module with no preference (each call picks by DEFAULT_ORDER).
AUTO = "auto"


def backend_problem(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` (or ``auto``) can be benchmarked on ``device``, else why not."""
    if name == AUTO:
        return None
    if name == "triton" and device.type != "cuda":
        return "benchmarked on CUDA only (on the CPU Triton runs in its interpreter, a test tool)"
    # The device mismatch first: it is the relevant reason even when the backend did not load either.
    return backends.device_error(name, device) or backends.load_error(name)


def default_backends(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """Every backend of ``DEFAULT_ORDER[device]`` that loaded and serves the device, and the reasons
    the others were left out."""
    chosen, left_out = [], {}
    for name in backends.DEFAULT_ORDER.get(device.type, ("reference",)):
        reason = backend_problem(name, device)
        if reason:
            left_out[name] = reason
        else:
            chosen.append(name)
    return chosen, left_out


def variant_names(benchmark: Benchmark, backend_names: Sequence[str]) -> List[str]:
    """The names of every variant :func:`prepare_case` builds, in its order."""
    return [EAGER, *benchmark.baselines, COMPILED] + [f"fused-{b}" for b in backend_names]


@dataclass
class Variant:
    """One way of computing the case; ``backend`` is set for our fused module."""

    name: str
    kind: str
    fn: Callable[[Tensor], Tensor]
    backend: Optional[str] = None

    def context(self):
        return use_backend(self.backend) if self.backend not in (None, AUTO) else contextlib.nullcontext()


@dataclass
class PreparedCase:
    """A case ready to time: inputs generated, variants built and checked against float64."""

    benchmark: Benchmark
    case: Case
    dtype: torch.dtype
    device: torch.device
    inputs: List[Tensor]
    reference: Optional[Tensor]  # float64 output on inputs[0]; None until check_against_float64
    tolerance: float
    variants: List[Variant] = field(default_factory=list)
    errors: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    compile_s: Optional[float] = None
    # Until check_against_float64: the float64 module and each variant's output on inputs[0].
    reference_module: Optional[torch.nn.Module] = None
    outputs: Dict[str, Tensor] = field(default_factory=dict)


class CaseSkipped(RuntimeError):
    """Eager PyTorch itself cannot run the case (e.g. a dtype unsupported on this device)."""


def _reason(e: BaseException) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line[:300]}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_case(benchmark: Benchmark, case: Case, dtype: torch.dtype, device: torch.device,
                 backend_names: Sequence[str], use_compile: bool = True, check: bool = True) -> PreparedCase:
    """Builds and runs every variant once on the first input. With ``check`` their errors against
    float64 are computed now; without, call :func:`check_against_float64` after timing (the float64
    forward frees large blocks, which raises glibc's mmap threshold and so speeds up the eager
    variants timed after it in the same process: EdgeNeXt-XXS eager 135-153 ms alone, 96-117 ms after
    a float64 forward, CI machine)."""
    # Modules are built, copied and cast outside inference mode, as a user's model is: parameters
    # made inside it would be inference tensors, which have no version counter for the fold cache.
    master = benchmark.build_module(case)
    reference_module = copy.deepcopy(master).to(device=device, dtype=torch.float64)
    eager = copy.deepcopy(master).to(device=device, dtype=dtype)
    try:
        fused, fuse_error = benchmark.fuse(copy.deepcopy(eager)), None
    except Exception as e:  # e.g. modules.Unsupported: the fused rows say why they are missing
        fused, fuse_error = None, "cannot build the fused module: " + _reason(e)
    with torch.inference_mode():
        first = benchmark.make_input(case, dtype, device)
        count = rotation_count(first.numel() * first.element_size())
        inputs = [first] + [benchmark.make_input(case, dtype, device) for _ in range(count - 1)]
        try:
            eager_out = eager(first)
        except Exception as e:
            raise CaseSkipped(f"eager PyTorch cannot run it: {_reason(e)}") from e
        prepared = PreparedCase(benchmark, case, dtype, device, inputs, None, math.inf,
                                reference_module=reference_module, outputs={EAGER: eager_out})

        def add(variant: Variant) -> None:
            try:
                with variant.context():
                    prepared.outputs[variant.name] = variant.fn(first)
                prepared.variants.append(variant)
            except Exception as e:  # an unsupported dtype, a missing kernel: report, go on
                prepared.skipped[variant.name] = _reason(e)

        add(Variant(EAGER, BASELINE, eager))
        for name, make in benchmark.baselines.items():
            try:
                baseline = make(eager)
            except Exception as e:
                prepared.skipped[name] = _reason(e)
                continue
            add(Variant(name, BASELINE, baseline))

        if use_compile:
            # A fresh dynamo state per case: every case compiles the same forward code object, and
            # past the recompile limit dynamo would silently run eager instead.
            torch.compiler.reset()
            compiled = torch.compile(eager)
            start = time.perf_counter()
            add(Variant(COMPILED, BASELINE, compiled))  # the first call compiles, outside timing
            _synchronize(device)
            if COMPILED not in prepared.skipped:
                prepared.compile_s = time.perf_counter() - start
            else:
                prepared.skipped[COMPILED] = "compilation failed: " + prepared.skipped[COMPILED]

        for backend in backend_names:
            if fused is None:
                prepared.skipped[f"fused-{backend}"] = fuse_error
            else:
                add(Variant(f"fused-{backend}", FUSED, fused, backend))
    if check:
        check_against_float64(prepared)
    return prepared


def check_against_float64(prepared: PreparedCase) -> None:
    """Sets ``prepared``'s float64 reference, tolerance (from eager's error) and every variant's
    error, from the outputs ``prepare_case`` kept; then drops those outputs and the float64 module."""
    with torch.inference_mode():
        reference = prepared.reference_module(prepared.inputs[0].to(torch.float64))
        prepared.reference = reference
        prepared.tolerance = tolerance(max_abs_error(prepared.outputs[EAGER], reference), reference, prepared.dtype)
        for variant in prepared.variants:
            prepared.errors[variant.name] = max_abs_error(prepared.outputs[variant.name], reference)
    prepared.outputs, prepared.reference_module = {}, None


def time_variants(prepared: PreparedCase, warmup: int, repeats: int) -> Dict[str, Timing]:
    """Every variant timed with their repeats interleaved (``measure_round_robin``)."""

    def context_of(variant):
        @contextlib.contextmanager
        def context():
            with torch.inference_mode(), variant.context():
                yield
        return context

    timings, failed = measure_round_robin({v.name: (v.fn, context_of(v)) for v in prepared.variants},
                                          prepared.inputs, prepared.device, warmup, repeats)
    for name, error in failed.items():
        prepared.skipped[name] = "timing failed: " + _reason(error)
    return timings


def make_rows(prepared: PreparedCase, timings: Dict[str, Timing], peak_gbps: Optional[float] = None,
              datasheet_gbps: Optional[float] = None) -> List[dict]:
    """One JSON-ready row per timed variant: time, spread, speedups, throughput, error, pass/fail.
    ``peak_gbps`` is the measured copy bandwidth of the device (the roofline's ceiling),
    ``datasheet_gbps`` the vendor's figure; either may be None."""
    benchmark, case = prepared.benchmark, prepared.case
    itemsize = torch.empty((), dtype=prepared.dtype).element_size()
    min_bytes, flops = benchmark.min_bytes(case, itemsize), benchmark.flops(case)
    eager_s = timings[EAGER].median_s if EAGER in timings else None
    compiled_s = timings[COMPILED].median_s if COMPILED in timings else None
    rows = []
    for variant in prepared.variants:
        if variant.name not in timings:
            continue
        timing = timings[variant.name]
        seconds = timing.median_s
        gbps = min_bytes / seconds / 1e9 if min_bytes else None
        error = prepared.errors[variant.name]
        rows.append({
            "op": case.op, "case": case.label, "params": dict(case.params),
            "dtype": dtype_name(prepared.dtype), "impl": variant.name, "kind": variant.kind,
            "backend": variant.backend,
            **timing.as_dict(),
            "speedup_vs_eager": eager_s / seconds if eager_s else None,
            "speedup_vs_compile": compiled_s / seconds if compiled_s else None,
            "min_bytes": min_bytes, "flops": flops,
            "gbps": gbps,
            "gflops": flops / seconds / 1e9 if flops else None,
            "images_per_s": case.params["batch"] / seconds if "batch" in case.params else None,
            "peak_memory_pct": 100 * gbps / peak_gbps if gbps and peak_gbps else None,
            "datasheet_memory_pct": 100 * gbps / datasheet_gbps if gbps and datasheet_gbps else None,
            # JSON has no infinity: a non-finite or misshapen output is stored as null and fails.
            "max_abs_error": error if math.isfinite(error) else None, "tolerance": prepared.tolerance,
            "passed": error <= prepared.tolerance,
            "compile_s": prepared.compile_s if variant.name == COMPILED else None,
            "inputs_rotated": len(prepared.inputs),
        })
    return rows


def skipped_rows(prepared: PreparedCase) -> List[dict]:
    return [{"op": prepared.case.op, "case": prepared.case.label, "dtype": dtype_name(prepared.dtype),
             "impl": name, "reason": reason} for name, reason in prepared.skipped.items()]
